"""A new track's state stays bounded whatever its listeners, and its vector is the exact item half-step
over all of them (issue #12 item 2, issue #20): offline worker, `track-plays` records as the user side
sends them."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from batch.foldin import fold_in
from batch.model_store import ModelStore
from batch.training import train_and_publish
from stream.codec import pack_message, unpack_message
from stream.settings import WorkerSettings
from stream.track_state import confidence_weight, stats_key, unpack_stats
from stream.worker import StreamWorker

from .records import Record
from .synthetic import random_plays, synthetic_counts
from .test_live_model import PARAMS

ROW_LIMIT = 64 * 1024


@pytest.fixture
def worker(tmp_path):
    store = ModelStore(tmp_path / "store")
    train_and_publish(
        synthetic_counts(random_plays(60, 40, 0.1, seed=3)), store, PARAMS, holdout=0, show_progress=False
    )
    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store.root, data_dir=tmp_path / "data"))
    worker.assigned_partitions = lambda: list(range(worker.settings.partitions))
    worker.largest_row = 0
    worker.published = []

    async def write(entries):
        for key, value, _ in entries:
            worker.listeners.data[key] = value
            worker.largest_row = max(worker.largest_row, len(value))

    async def send(topic, key, value, **kwargs: Any) -> asyncio.Future:
        worker.published.append(unpack_message(value))
        delivered = asyncio.get_running_loop().create_future()  # like faust's: the record's delivery
        delivered.set_result(None)
        return delivered

    worker.listener_writer.write = write
    worker.app.producer.send = send
    return worker


def track_play(track: str, user: str, count: int, x: np.ndarray | None, version: str | None, offset: int) -> Record:
    body = {
        "track": track,
        "user": user,
        "count": count,
        "x": None if x is None else x.astype("<f4").tobytes(),
        "v": version,
    }
    return Record("track-plays", 0, offset, track.encode(), pack_message(body))


def half_step(worker: StreamWorker, vectors: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The batch item half-step over these listeners against the worker's X^T X."""
    live = worker.live
    plays = sp.csr_matrix((counts.astype(np.float32), np.arange(len(counts)), [0, len(counts)]), shape=(1, len(counts)))
    return fold_in(plays, vectors, live.params, gram=live.user_gram)[0]


def last_vector(worker: StreamWorker, track: str) -> tuple[np.ndarray, dict]:
    body = [b for b in worker.published if b["track"] == track][-1]
    return np.frombuffer(body["x"], "<f4"), body


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_100000_listeners_keep_the_rows_bounded_and_the_vector_exact(worker):
    live = worker.live
    rng = np.random.default_rng(0)
    n = 100_000
    vectors = (rng.standard_normal((n, live.k)) * 0.3).astype(np.float32)
    counts = rng.integers(1, 40, n)

    async def scenario():
        for start in range(0, n, 5000):
            batch = [
                track_play("hit", f"l{i}", int(counts[i]), vectors[i], live.version, i)
                for i in range(start, start + 5000)
            ]
            await worker.on_track_plays(batch)
        await worker.resolve_tracks()  # the timer's re-solve after the last update

    asyncio.run(scenario())
    assert worker.largest_row < ROW_LIMIT, worker.largest_row
    solves = [b["listeners"] for b in worker.published if b["track"] == "hit"]
    assert solves[0] == 5000 and solves[-1] == n  # solved at the first batch, doublings, then exact at the end
    assert len(solves) <= 8
    vector, body = last_vector(worker, "hit")
    assert body["version"] == live.version
    assert relative_error(vector, half_step(worker, vectors, counts)) < 1e-4


def test_listeners_that_change_count_again_and_reach_every_later_solve(worker):
    live = worker.live
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, live.k)) * 0.3).astype(np.float32)

    async def scenario():
        # three listeners have no vector yet (new users whose first stream is the hit), five have one
        await worker.on_track_plays([track_play("n1", f"a{i}", 1, None, None, i) for i in range(3)])
        await worker.on_track_plays([track_play("n1", f"b{i}", 2, x[i], live.version, 10 + i) for i in range(5)])
        first = last_vector(worker, "n1")[0]
        np.testing.assert_allclose(first, half_step(worker, x[:5], np.full(5, 2)), rtol=1e-4, atol=1e-6)
        # the three get vectors (their fold-in), one of the five streams again and gets a new vector
        await worker.on_track_plays([track_play("n1", f"a{i}", 1, x[5 + i], live.version, 20 + i) for i in range(3)])
        moved = (x[0] * 0.5).astype(np.float32)
        again = track_play("n1", "b0", 7, moved, live.version, 30)
        await worker.on_track_plays([again, again])  # re-sent: applied once
        await worker.resolve_tracks()
        return first

    first = asyncio.run(scenario())
    vectors = np.vstack([moved_x(x), x[1:5], x[5:8]])
    counts = np.array([7, 2, 2, 2, 2, 1, 1, 1])
    final = last_vector(worker, "n1")[0]
    assert not np.allclose(final, first, rtol=1e-3)
    assert relative_error(final, half_step(worker, vectors, counts)) < 1e-4
    stats = unpack_stats(worker.listeners.data[stats_key("n1")], live.version, live.k)
    assert stats.listeners == 8
    assert confidence_weight(7, live.params) > confidence_weight(2, live.params)


def moved_x(x: np.ndarray) -> np.ndarray:
    return (x[0] * 0.5).astype(np.float32)[None, :]


def test_vectors_of_another_model_version_do_not_count(worker):
    live = worker.live
    x = np.ones((6, live.k), np.float32) * 0.1

    async def scenario():
        await worker.on_track_plays([track_play("n2", f"c{i}", 1, x[i], "some-old-version", i) for i in range(6)])

    asyncio.run(scenario())
    assert not [b for b in worker.published if b["track"] == "n2"]
    assert unpack_stats(worker.listeners.data[stats_key("n2")], live.version, live.k).listeners == 0


def test_after_a_swap_to_another_seed_and_factor_count_a_track_is_solved_against_the_new_model(worker, tmp_path):
    """Issue #12 item 1: a new track folded in under one model is re-solved, after a swap to a model
    trained with another seed and another factor count, from its listeners' vectors of the new model:
    its vector equals the item half-step against the new model's user vectors (rel. error < 1e-4), and
    listener updates still carrying old-model vectors do not count."""
    old = worker.live
    rng = np.random.default_rng(11)
    x_old = rng.normal(0, 0.1, (8, old.k)).astype(np.float32)
    counts = rng.integers(1, 20, 8)

    async def stream(x: np.ndarray, version: str, offset: int) -> None:
        await worker.on_track_plays(
            [track_play("n9", f"f{i}", int(counts[i]), x[i], version, offset + i) for i in range(len(x))]
        )

    asyncio.run(stream(x_old, old.version, 0))
    assert last_vector(worker, "n9")[1]["version"] == old.version
    store = ModelStore(worker.settings.store)
    params = replace(PARAMS, factors=PARAMS.factors + 3, seed=PARAMS.seed + 7)
    new = train_and_publish(
        synthetic_counts(random_plays(60, 40, 0.1, seed=3)), store, params, holdout=0, show_progress=False
    ).version
    asyncio.run(worker._load_and_refold(new))
    live = worker.live
    assert live.version == new and live.k == old.k + 3
    asyncio.run(stream(x_old, old.version, 100))  # stale re-sends of old-model vectors: ignored
    assert last_vector(worker, "n9")[1]["version"] == old.version
    x_new = rng.normal(0, 0.1, (8, live.k)).astype(np.float32)  # the listeners' re-folded vectors
    asyncio.run(stream(x_new, new, 200))
    asyncio.run(worker.resolve_tracks())
    vector, body = last_vector(worker, "n9")
    assert body["version"] == new and len(vector) == live.k and body["listeners"] == 8
    assert relative_error(vector, half_step(worker, x_new, counts)) < 1e-4


def test_a_kill_before_the_announcement_is_delivered_announces_it_on_redelivery(worker):
    """The lifecycle test caught it (#21, day 1, kill -9): the rows recording a solve were written before
    the vector's announcement was delivered; a kill in between lost the announcement for good (the
    re-delivered records look applied) and the track was never searchable. Announcements are now
    delivered first: a failed delivery leaves the rows unwritten and the re-delivered batch announces."""
    live = worker.live
    x = np.random.default_rng(4).normal(0, 0.1, (6, live.k)).astype(np.float32)
    batch = [track_play("n7", f"k{i}", 3, x[i], live.version, i) for i in range(6)]
    deliver = worker.app.producer.send

    async def killed(topic, key, value, **kwargs: Any):
        raise RuntimeError("worker killed before the announcement was delivered")

    worker.app.producer.send = killed
    with pytest.raises(RuntimeError):
        asyncio.run(worker.on_track_plays(batch))
    assert stats_key("n7") not in worker.listeners.data  # nothing recorded: the batch is not applied
    worker.app.producer.send = deliver
    asyncio.run(worker.on_track_plays(batch))  # the same records, re-delivered to the next owner
    vector, body = last_vector(worker, "n7")
    assert body["listeners"] == 6 and body["version"] == live.version
    assert relative_error(vector, half_step(worker, x, np.full(6, 3))) < 1e-4


@pytest.mark.parametrize("durable", [0, 1, 3, 5])
def test_a_kill_between_the_statistics_and_the_listener_rows_counts_every_listener_once(worker, durable):
    """Found by the lifecycle test (#21, day 1, kill -9 of a track's owner): listener rows were written
    before the track's statistics, and a kill between the two left listeners whose contributions the
    statistics lacked; the re-delivered records then looked like re-sends and never counted. The
    statistics are now written first and record the last `track-plays` offset they hold: wherever a kill
    interrupts the batch's writes (`durable` rows reached the changelog), the re-delivered batch counts
    each listener exactly once."""
    live = worker.live
    x = np.random.default_rng(8).normal(0, 0.1, (9, live.k)).astype(np.float32)
    counts = np.arange(1, 10)
    first = [track_play("n8", f"m{i}", int(counts[i]), x[i], live.version, i) for i in range(4)]
    second = [track_play("n8", f"m{i}", int(counts[i]), x[i], live.version, i) for i in range(4, 9)]
    asyncio.run(worker.on_track_plays(first))
    write = worker.listener_writer.write
    budget = [durable]

    async def killed(entries):  # the first `durable` rows of the batch reach the changelog, then the kill
        kept, budget[0] = entries[: budget[0]], max(0, budget[0] - len(entries))
        await write(kept)
        if len(kept) < len(entries):
            raise RuntimeError("worker killed during the changelog write")

    worker.listener_writer.write = killed
    with pytest.raises(RuntimeError):
        asyncio.run(worker.on_track_plays(second))
    worker.listener_writer.write = write
    asyncio.run(worker.on_track_plays(second))  # re-delivered to the next owner
    asyncio.run(worker.resolve_tracks())
    restored = unpack_stats(worker.listeners.data[stats_key("n8")], live.version, live.k)
    assert restored.listeners == 9
    vector, body = last_vector(worker, "n8")
    assert body["listeners"] == 9
    assert relative_error(vector, half_step(worker, x, counts)) < 1e-4


def test_a_track_solved_at_5_listeners_is_solved_again_over_1000(worker):
    """Issue #20 test 2: the vector after 1,000 listeners differs from the one after the first 5 and equals
    the item half-step over those 1,000 (the doubling schedule, then the timer's exact re-solve)."""
    live = worker.live
    rng = np.random.default_rng(20)
    x = (rng.standard_normal((1000, live.k)) * 0.3).astype(np.float32)
    counts = rng.integers(1, 30, 1000)

    async def listen(lo: int, hi: int) -> None:
        await worker.on_track_plays(
            [track_play("grower", f"g{i}", int(counts[i]), x[i], live.version, i) for i in range(lo, hi)]
        )

    asyncio.run(listen(0, 5))
    after_5, body = last_vector(worker, "grower")
    assert body["listeners"] == 5
    np.testing.assert_allclose(after_5, half_step(worker, x[:5], counts[:5]), rtol=1e-4, atol=1e-6)
    for lo in range(5, 1000, 199):
        asyncio.run(listen(lo, min(lo + 199, 1000)))
    asyncio.run(worker.resolve_tracks())
    after_1000, body = last_vector(worker, "grower")
    assert body["listeners"] == 1000
    assert relative_error(after_1000, after_5) > 0.05
    assert relative_error(after_1000, half_step(worker, x, counts)) < 1e-4
    solves = [b["listeners"] for b in worker.published if b["track"] == "grower"]
    assert solves == sorted(solves) and len(solves) <= 10, solves  # 5, the doublings, then all 1,000
