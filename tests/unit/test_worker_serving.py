"""Which vector answers for a user while the background fold-in is behind (StreamWorker.serving_vector).

The worker is built offline (no broker is contacted before it starts); batches go through `on_plays`
as the ingest hands them over, and the changelog write at the end of a fold-in is captured in memory.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import numpy as np
import pytest

from batch.model_store import ModelStore
from batch.training import train_and_publish
from batch.user_state import unpack_user
from stream.events import encode_play
from stream.settings import WorkerSettings
from stream.worker import StreamWorker

from .synthetic import random_plays, synthetic_counts
from .test_live_model import PARAMS


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


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


def batch(worker: StreamWorker, user: str, tracks: list[str], first_offset: int) -> list[Record]:
    key = user.encode()
    partition = worker.partitioner(key)
    records = []
    for i, track in enumerate(tracks):
        _, value = encode_play(user, track, 1_700_000_000_000, 200_000)
        records.append(Record(worker.topics.plays, partition, first_offset + i, key, value))
    return records


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
