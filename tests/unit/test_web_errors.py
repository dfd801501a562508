"""The HTTP API answers 404 only for explicit misses (#12, "Also"): an unknown track is 404 with its name,
while a KeyError raised by a bug inside a handler is a 500 with a generic message (logged with its
traceback), not a 404 that hides it. The worker is built offline and its aiohttp app served in-process."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from batch.model_store import ModelStore
from batch.training import train_and_publish
from stream.settings import WorkerSettings
from stream.worker import StreamWorker

from .synthetic import random_plays, synthetic_counts
from .test_live_model import PARAMS


def test_an_unknown_track_is_404_and_a_stray_key_error_is_500(tmp_path, caplog):
    store = ModelStore(tmp_path / "store")
    counts = synthetic_counts(random_plays(40, 30, 0.1, seed=2))
    train_and_publish(counts, store, PARAMS, holdout=0, show_progress=False)
    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store.root, data_dir=tmp_path / "data"))
    worker.takedown_reader.caught_up.set()  # (no broker: nothing to read)
    worker.app.web.init_server()
    known = str(worker.live.item_ids[0])

    async def scenario() -> list[tuple[int, dict]]:
        async with TestClient(TestServer(worker.app.web.web_app)) as client:
            answers = []
            for path in (f"/tracks/{known}/similar?k=3", "/tracks/no-such-track/similar?k=3"):
                response = await client.get(path)
                answers.append((response.status, await response.json()))

            def broken(track: str, k: int):  # a bug: a dict lookup that misses inside the handler
                return {}["oops"]

            worker.live.similar = broken
            response = await client.get(f"/tracks/{known}/similar?k=3")
            answers.append((response.status, await response.json()))
            return answers

    (ok, _), (missing, body), (bug, bug_body) = asyncio.run(scenario())
    assert ok == 200
    assert missing == 404 and "no-such-track" in body["error"]
    assert bug == 500 and "oops" not in bug_body["error"], bug_body
    assert any("failed" in r.getMessage() and r.exc_info for r in caplog.records)
