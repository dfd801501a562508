"""A stream worker's handling of batches, offline: which vector answers for a user while the background
fold-in is behind (StreamWorker.serving_vector), and plays a client sends again (event ids).

The worker is built offline (no broker is contacted before it starts); batches go through `on_plays`
as the ingest hands them over, and the changelog write at the end of a fold-in is captured in memory.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from batch.model_store import ModelStore
from batch.training import train_and_publish
from batch.user_state import EVENT_DIGEST_BYTES, event_digest, unpack_user
from stream.events import encode_play
from stream.settings import WorkerSettings
from stream.worker import StreamWorker

from .records import Record
from .synthetic import random_plays, synthetic_counts
from .test_live_model import PARAMS


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    train_and_publish(synthetic_counts(random_plays(60, 40, 0.1, seed=3)), ModelStore(path), PARAMS, holdout=0)
    return path


@pytest.fixture
def worker(store_path, tmp_path):
    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store_path, data_dir=tmp_path / "data"))
    worker.written = []

    async def write(entries):  # the changelog write, kept in memory
        worker.written.extend(entries)
        for key, value, _ in entries:
            worker.users.data[key] = value

    worker.user_writer.write = write
    return worker


def batch(
    worker: StreamWorker, user: str, tracks: list[str], first_offset: int, event_ids: list[str | None] | None = None
) -> list[Record]:
    key = user.encode()
    partition = worker.partitioner(key)
    records = []
    for i, track in enumerate(tracks):
        _, value = encode_play(user, track, 1_700_000_000_000, 200_000, event_ids[i] if event_ids else None)
        records.append(Record(worker.topics.plays, partition, first_offset + i, key, value))
    return records


def metric(worker: StreamWorker, name: str) -> float:
    return worker.metrics.registry.get_sample_value(name) or 0.0


def exact(worker: StreamWorker, user: str) -> np.ndarray:
    live = worker.live
    return live.fold_in_users({user: live.full_counts(user, worker.user_state(user).counts)})[user]


def test_answers_reflect_every_counted_play_before_the_fold_in_publishes(worker):
    async def scenario():
        live = worker.live
        user = "u7"  # in the model: served from the model's row until their first stream
        vector, source = worker.serving_vector(live, user, {})
        assert source == "model"
        np.testing.assert_array_equal(vector, live.model_user_vector(user))

        await worker.on_plays(batch(worker, user, ["t1", "t2"], 0))
        first = worker._fold_task  # started, not run yet: the stored vector is behind the counts
        counts = worker.user_state(user).counts
        assert counts == {"t1": 1, "t2": 1}
        vector, source = worker.serving_vector(live, user, counts)
        assert source == "fold-in"
        np.testing.assert_allclose(vector, exact(worker, user), rtol=1e-5)

        await worker.on_plays(batch(worker, user, ["t3"], 2))  # counted before the first fold-in runs
        await first  # publishes the vector of t1 + t2 only: still behind t3
        behind = worker.user_state(user)
        assert behind.vector is not None and behind.counts == {"t1": 1, "t2": 1, "t3": 1}
        vector, _ = worker.serving_vector(live, user, behind.counts)
        assert not np.allclose(vector, behind.vector, rtol=1e-3)
        np.testing.assert_allclose(vector, exact(worker, user), rtol=1e-5)

        await worker.drain_fold_ins()  # the second fold-in takes t3
        stored = worker.user_state(user)
        vector, source = worker.serving_vector(live, user, stored.counts)
        assert source == "fold-in" and vector is stored.vector  # caught up: the stored vector answers
        np.testing.assert_allclose(stored.vector, exact(worker, user), rtol=1e-5)
        # each fold-in wrote the user's row once, with the counts and offset its vector was solved from
        rows = [unpack_user(value) for key, value, _ in worker.written if key == user.encode()]
        assert [(r.counts, r.offset) for r in rows] == [({"t1": 1, "t2": 1}, 1), ({"t1": 1, "t2": 1, "t3": 1}, 2)]
        np.testing.assert_allclose(rows[-1].vector, stored.vector)

    asyncio.run(scenario())


def test_a_new_user_is_solved_on_request_from_their_first_streams(worker):
    async def scenario():
        live = worker.live
        assert worker.serving_vector(live, "newcomer", {}) == (None, "popularity")
        await worker.on_plays(batch(worker, "newcomer", ["t0", "t0", "t5"], 0))
        counts = worker.user_state("newcomer").counts
        vector, source = worker.serving_vector(live, "newcomer", counts)
        assert source == "fold-in"
        np.testing.assert_allclose(vector, exact(worker, "newcomer"), rtol=1e-5)
        await worker.drain_fold_ins()
        assert worker.serving_vector(live, "newcomer", counts)[0] is worker.user_state("newcomer").vector

    asyncio.run(scenario())


def test_a_play_sent_again_is_counted_once(worker, store_path, tmp_path):
    async def scenario():
        ids = ["a", "b", "a", None, None, "c", "b"]  # "a" and "b" sent twice; id-less plays always count
        await worker.on_plays(batch(worker, "u3", ["t1", "t2", "t1", "t4", "t4", "t5", "t2"], 0, ids))
        await worker.on_plays(batch(worker, "u3", ["t5"], 7, ["c"]))  # again, in a later batch
        await worker.drain_fold_ins()
        assert worker.user_state("u3").counts == {"t1": 1, "t2": 1, "t4": 2, "t5": 1}
        assert metric(worker, "playrec_duplicate_events_total") == 3
        assert metric(worker, "playrec_events_processed_total") == 5
        return worker.users.data[b"u3"]

    row = asyncio.run(scenario())
    assert unpack_user(row).recent == b"".join(event_digest(i) for i in ("a", "b", "c"))

    # a restarted worker recovers the ids with the row: a re-send after the restart is still skipped
    again = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store_path, data_dir=tmp_path / "again"))
    again.users.data[b"u3"] = row
    again.user_writer.write = worker.user_writer.write

    async def after_restart():
        await again.on_plays(batch(again, "u3", ["t1", "t6"], 8, ["a", "d"]))
        await again.drain_fold_ins()

    asyncio.run(after_restart())
    assert again.user_state("u3").counts == {"t1": 1, "t2": 1, "t4": 2, "t5": 1, "t6": 1}
    assert metric(again, "playrec_duplicate_events_total") == 1


def test_event_ids_are_remembered_per_user_up_to_a_bound(worker):
    from stream.worker import RECENT_EVENT_IDS

    async def scenario():
        n = RECENT_EVENT_IDS + 1
        await worker.on_plays(batch(worker, "u4", ["t1"] * n, 0, [f"e{i}" for i in range(n)]))
        await worker.on_plays(batch(worker, "u5", ["t1"], 0, ["e1"]))  # ids are per user
        # the oldest id has left the window (a re-send that late counts again); the others are still known
        await worker.on_plays(batch(worker, "u4", ["t1", "t1"], n, ["e1", "e0"]))
        await worker.drain_fold_ins()

    asyncio.run(scenario())
    state = worker.user_state("u4")
    assert len(state.recent) == RECENT_EVENT_IDS * EVENT_DIGEST_BYTES and state.recent.endswith(event_digest("e0"))
    assert state.counts == {"t1": RECENT_EVENT_IDS + 2}  # all but the re-sent "e1"
    assert worker.user_state("u5").counts == {"t1": 1}
    assert metric(worker, "playrec_duplicate_events_total") == 1


def test_a_users_row_keeps_a_bounded_number_of_tracks(worker, monkeypatch):
    """Past MAX_USER_TRACKS distinct tracks the least-played are dropped (down to 90%), the row stays
    bounded and the user's vector is the exact fold-in of the kept counts (not an incremental update of
    the cached system, which still holds the dropped tracks)."""
    import stream.worker as worker_module

    monkeypatch.setattr(worker_module, "MAX_USER_TRACKS", 20)

    async def scenario():
        first = ["t1"] * 5 + ["t2"] * 3 + ["t3", "t3"] + [f"t{i}" for i in range(4, 16)]
        await worker.on_plays(batch(worker, "u9", first, 0))  # 15 tracks: kept, the system is cached
        await worker.drain_fold_ins()
        await worker.on_plays(batch(worker, "u9", ["t30", "t30"] + [f"t{i}" for i in range(16, 26)], len(first)))
        await worker.drain_fold_ins()  # 26 tracks: trimmed to 18, the user solved again from the kept ones

    asyncio.run(scenario())
    state = worker.user_state("u9")
    assert len(state.counts) == 18 and (state.counts["t1"], state.counts["t2"], state.counts["t30"]) == (5, 3, 2)
    assert metric(worker, "playrec_user_tracks_trimmed_total") == 26 - 18
    np.testing.assert_allclose(state.vector, exact(worker, "u9"), rtol=1e-4, atol=1e-6)
    assert unpack_user(worker.users.data[b"u9"]).counts == state.counts
