"""A model swap builds the new LiveModel off the event loop from a snapshot and installs it on the loop
after replaying what arrived meanwhile: a take-down published during a swap is masked in the new model
(issue #12 item 5), and folded-in vectors of another factor count do not break the swap."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.training import train_and_publish
from stream.codec import pack_message
from stream.live_model import LiveModel, UnknownTrackError
from stream.settings import WorkerSettings
from stream.worker import StreamWorker

from .records import Record
from .synthetic import gram_from_scratch, random_plays, synthetic_counts
from .test_live_model import PARAMS

COUNTS = synthetic_counts(random_plays(60, 40, 0.1, seed=3))


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
    worker.track_vectors = {"fresh-track": (np.ones(old.k, np.float32), old.version)}
    new_version = train_and_publish(
        COUNTS, store, AlsParams(factors=PARAMS.factors, iterations=3, seed=99), holdout=0, show_progress=False
    ).version
    entered, release = threading.Event(), threading.Event()
    take_down = LiveModel.take_down

    def gated(self, tracks):  # hold the build (off the loop) until the take-down has been handled
        tracks = list(tracks)
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            assert release.wait(30), "the test never released the build"
        return take_down(self, tracks)

    monkeypatch.setattr(LiveModel, "take_down", gated)

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


def test_a_swap_does_not_serve_track_vectors_of_another_model(store, tmp_path):
    """Issue #12 item 1: a folded-in vector belongs to the model it was solved against (another model has
    another latent basis, maybe another factor count): the new model does not serve it until the track's
    owner re-solves it (tests/unit/test_track_state.py)."""
    worker = offline_worker(store, tmp_path)
    old = worker.live
    worker.track_vectors = {"fresh-track": (np.ones(old.k, np.float32), old.version)}
    asyncio.run(worker.on_track_vectors([]))
    other_k = train_and_publish(
        COUNTS, store, AlsParams(factors=PARAMS.factors + 3, iterations=3, seed=5), holdout=0, show_progress=False
    ).version
    asyncio.run(worker._load_and_refold(other_k))
    assert worker.live.version == other_k and worker.live.k == PARAMS.factors + 3
    assert "fresh-track" not in worker.live
    # a vector solved against the live model is served at once; one of the old model is not
    good = Record(
        "track-vectors",
        0,
        1,
        b"n2",
        pack_message({"track": "n2", "x": np.ones(worker.live.k, "<f4").tobytes(), "listeners": 5, "version": other_k}),
    )
    stale = Record(
        "track-vectors",
        0,
        2,
        b"n3",
        pack_message(
            {"track": "n3", "x": np.ones(worker.live.k, "<f4").tobytes(), "listeners": 5, "version": old.version}
        ),
    )
    asyncio.run(worker.on_track_vectors([good, stale]))
    assert "n2" in worker.live and "n3" not in worker.live


def test_a_refold_writes_no_row_of_a_revoked_partition_after_the_revocation(store, tmp_path, monkeypatch):
    """Issue #12 item 3: the re-fold after a swap is stopped by a revocation and never writes afterwards;
    rows of partitions no longer assigned are never written by it."""
    import stream.worker as worker_module
    from batch.user_state import UserState, pack_user

    monkeypatch.setattr(worker_module, "REFOLD_BATCH", 20)
    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store.root, data_dir=tmp_path / "data"))
    P = worker.settings.partitions
    users = [f"u{i}" for i in range(60)]
    for user in users:  # counted users of every partition, with vectors of the current model
        worker.users.data[user.encode()] = pack_user(UserState({"t1": 2, "t3": 1}, offset=5))
    assigned = set(range(P))
    worker.assigned_partitions = lambda: sorted(assigned)
    writes: list[tuple[str, int, bool]] = []  # (user, partition, after the revocation returned)
    revoked_done = threading.Event()

    async def write(entries):
        writes.extend((key.decode(), partition, revoked_done.is_set()) for key, _, partition in entries)

    worker.user_writer.write = write
    new_version = train_and_publish(
        COUNTS, store, AlsParams(factors=PARAMS.factors, iterations=3, seed=7), holdout=0, show_progress=False
    ).version
    entered, release = threading.Event(), threading.Event()
    fold_in_users = LiveModel.fold_in_users
    calls = []

    def gated(self, full):
        calls.append(len(full))
        if len(calls) == 2 and threading.current_thread() is not threading.main_thread():
            entered.set()  # the second chunk is being solved: revoke now
            assert release.wait(30), "never released"
        return fold_in_users(self, full)

    monkeypatch.setattr(LiveModel, "fold_in_users", gated)
    revoked = {p for p in range(P) if p % 2}

    async def scenario():
        loop = asyncio.get_running_loop()
        await worker._load_and_refold(new_version)
        assert await loop.run_in_executor(None, entered.wait, 30), "the re-fold never reached its second chunk"
        assigned.difference_update(revoked)
        revocation = asyncio.ensure_future(worker._on_partitions_revoked(worker.app, revoked))
        await asyncio.sleep(0)
        release.set()
        await revocation
        revoked_done.set()
        # a second swap's re-fold runs on the smaller assignment: it writes only the partitions still held
        third = await loop.run_in_executor(
            None,
            lambda: (
                train_and_publish(
                    COUNTS,
                    store,
                    AlsParams(factors=PARAMS.factors, iterations=3, seed=8),
                    holdout=0,
                    show_progress=False,
                ).version
            ),
        )
        await worker._load_and_refold(third)
        await worker._refold_task

    asyncio.run(scenario())
    first_chunk = [w for w in writes if not w[2]]
    assert len(first_chunk) == 20  # the chunk solved before the revocation
    assert all(not after or partition not in revoked for _, partition, after in writes), "wrote a revoked row"
    later = {user for user, _, after in writes if after}
    assert later == {u for u in users if worker.partitioner(u.encode()) not in revoked}


def test_user_gram_equals_a_from_scratch_gram_after_a_swap_a_refold_and_10000_fold_ins(store, tmp_path):
    """Issue #12 item 4: the X^T X the track half-step uses is the model's users' factors with each row
    replaced by the user's current fold-in vector (and new users' vectors added), as this worker knows
    them; kept exact through a swap, its re-fold and 10,000 user fold-ins."""
    import random

    from batch.user_state import UserState, pack_user
    from stream.events import encode_play

    worker = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store.root, data_dir=tmp_path / "data"))
    worker.assigned_partitions = lambda: list(range(worker.settings.partitions))

    async def write(entries):
        for key, value, _ in entries:
            worker.users.data[key] = value

    async def track_side(**kwargs):
        delivered = asyncio.get_running_loop().create_future()  # faust: a future resolved on delivery
        delivered.set_result(None)
        return delivered

    worker.user_writer.write = write
    worker.track_plays.send = track_side
    for i in range(40):  # counted before the swap: model users and new ones
        user = f"u{i}" if i % 2 else f"new{i}"
        worker.users.data[user.encode()] = pack_user(UserState({"t1": 2, f"t{i % 30}": 1}, offset=0))
    rng = random.Random(4)
    version = train_and_publish(
        COUNTS, store, AlsParams(factors=PARAMS.factors, iterations=3, seed=11), holdout=0, show_progress=False
    ).version

    async def scenario():
        await worker._load_and_refold(version)
        await worker._refold_task
        offset = 1

        def solved() -> float:
            return worker.metrics.registry.get_sample_value("playrec_user_fold_ins_total")

        while solved() < 10_000 + 40:  # batches of 100 plays until 10,000 user fold-ins (after the re-fold)
            batch = []
            for _ in range(100):
                user = rng.choice([f"u{rng.randrange(60)}", f"new{rng.randrange(80)}", f"x{rng.randrange(500)}"])
                key, value = encode_play(user, f"t{rng.randrange(40)}", 1_700_000_000_000, 200_000)
                batch.append(Record(worker.topics.plays, worker.partitioner(key), offset, key, value))
                offset += 1
            await worker.on_plays(batch)
            await worker.drain_fold_ins()

    asyncio.run(scenario())
    live = worker.live
    assert live.version == version
    assert worker.metrics.registry.get_sample_value("playrec_user_fold_ins_total") >= 10_000
    scratch = gram_from_scratch(live, ((key.decode(), worker.user_state(key.decode())) for key in worker.users.data))
    error = np.linalg.norm(live.user_gram - scratch) / np.linalg.norm(scratch)
    assert error < 1e-4, error
