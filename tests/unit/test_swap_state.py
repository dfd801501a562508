"""A model swap builds the new LiveModel off the event loop from a snapshot and installs it on the loop
after replaying what arrived meanwhile: a take-down published during a swap is masked in the new model
(issue #12 item 5), and folded-in vectors of another factor count do not break the swap."""

from __future__ import annotations

import asyncio
import threading
from typing import NamedTuple

import numpy as np
import pytest

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.training import train_and_publish
from stream.codec import pack_message
from stream.live_model import LiveModel, UnknownTrackError
from stream.settings import WorkerSettings
from stream.worker import StreamWorker

from .synthetic import random_plays, synthetic_counts
from .test_live_model import PARAMS

COUNTS = synthetic_counts(random_plays(60, 40, 0.1, seed=3))


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


def takedown(track: str, down: bool = True) -> Record:
    body = {"track": track, "taken_down": down, "reason": "test", "at": 0}
    return Record("track-takedowns", 0, 0, track.encode(), pack_message(body))


@pytest.fixture
def store(tmp_path):
    store = ModelStore(tmp_path / "store")
    train_and_publish(COUNTS, store, PARAMS, holdout=0, show_progress=False)
    return store


def offline_worker(store: ModelStore, tmp_path) -> StreamWorker:
    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store.root, data_dir=tmp_path / "data"))

    async def refold() -> None:  # the re-fold after a swap is not what these tests look at
        pass

    worker.refold_local_users = refold
    return worker


def test_a_takedown_published_during_a_swap_is_masked_in_the_new_model(store, tmp_path, monkeypatch):
    worker = offline_worker(store, tmp_path)
    old = worker.live
    worker.track_vectors = {"fresh-track": np.ones(old.k, np.float32)}  # so the build calls add_tracks
    new_version = train_and_publish(
        COUNTS, store, AlsParams(factors=PARAMS.factors, iterations=3, seed=99), holdout=0, show_progress=False
    ).version
    entered, release = threading.Event(), threading.Event()
    add_tracks = LiveModel.add_tracks

    def gated(self, vectors):  # hold the build (off the loop) until the take-down has been handled
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            assert release.wait(30), "the test never released the build"
        return add_tracks(self, vectors)

    monkeypatch.setattr(LiveModel, "add_tracks", gated)

    async def scenario():
        loop = asyncio.get_running_loop()
        swap = asyncio.ensure_future(worker._load_and_refold(new_version))
        assert await loop.run_in_executor(None, entered.wait, 30), "the swap never started building"
        await worker.on_takedowns([takedown("t5"), takedown("fresh-track")])  # while the new model builds
        release.set()
        await swap

    asyncio.run(scenario())
    live = worker.live
    assert live.version == new_version and live is not old
    assert {"t5", "fresh-track"} <= live.taken_down
    with pytest.raises(UnknownTrackError, match="taken down"):
        live.similar("t5", 3)
    assert "t5" not in {s.track for s in live.similar("t6", 39)}


def test_a_swap_to_another_factor_count_skips_vectors_it_cannot_score(store, tmp_path):
    worker = offline_worker(store, tmp_path)
    worker.track_vectors = {"fresh-track": np.ones(worker.live.k, np.float32)}
    other_k = train_and_publish(
        COUNTS, store, AlsParams(factors=PARAMS.factors + 3, iterations=3, seed=5), holdout=0, show_progress=False
    ).version
    asyncio.run(worker._load_and_refold(other_k))
    assert worker.live.version == other_k and worker.live.k == PARAMS.factors + 3
    assert "fresh-track" not in worker.live
