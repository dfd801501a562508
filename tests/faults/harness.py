"""Shared parts of the fault tests: a small model, a replayable play log, a rate-limited producer
thread and exact checks of the workers' counts (over HTTP and in the changelog)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from kafka import KafkaProducer

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.plays import MIN_MS_PLAYED
from batch.snapshot import EmptySnapshotError, snapshot_counts
from batch.training import train_and_publish
from stream.events import encode_play

from ..integration.workers import WorkerProcess, wait_for
from ..unit.synthetic import random_plays, synthetic_counts

N_MODEL_USERS, N_TRACKS = 300, 120
PARTITIONS = 8


def publish_model(root: Path) -> ModelStore:
    """A store with one small model (synthetic users u0.., tracks t0..)."""
    store = ModelStore(root / "store")
    publish_version(store, plays_seed=5, params=AlsParams(factors=8, iterations=4, seed=3))
    return store


def publish_version(store: ModelStore, plays_seed: int, params: AlsParams) -> str:
    """Train on synthetic plays of the same users and tracks and publish to `store`; returns the version."""
    counts = synthetic_counts(random_plays(N_MODEL_USERS, N_TRACKS, 0.08, seed=plays_seed))
    return train_and_publish(counts, store, params, holdout=0, show_progress=False).version


@dataclass
class PlayLog:
    """`n` plays: (key, value) records and the counts they must produce (streams >= 30 s)."""

    records: list[tuple[bytes, bytes]]
    expected: dict[str, dict[str, int]]

    @property
    def streams(self) -> int:
        return sum(sum(c.values()) for c in self.expected.values())


def play_log(n: int, n_users: int = 2000, seed: int = 0) -> PlayLog:
    """Model users and new users, known and unknown tracks, ~10% plays shorter than 30 s."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    records, expected = [], {}
    for i in range(n):
        user = f"u{rng.randrange(N_MODEL_USERS)}" if rng.random() < 0.3 else f"f{rng.randrange(n_users)}"
        track = f"t{min(int(rng.paretovariate(0.8)), N_TRACKS + 40) - 1}"
        ms_played = rng.randrange(1_000, MIN_MS_PLAYED) if rng.random() < 0.1 else rng.randrange(MIN_MS_PLAYED, 400_000)
        records.append(encode_play(user, track, now - (n - i), ms_played))
        if ms_played >= MIN_MS_PLAYED:
            per_user = expected.setdefault(user, {})
            per_user[track] = per_user.get(track, 0) + 1
    return PlayLog(records, expected)


def replay_producer(bootstrap: str) -> KafkaProducer:
    """The fault tests' producer: idempotent, acks=all, retrying through broker restarts and take-overs."""
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        retries=2**31 - 1,
        delivery_timeout_ms=300_000,
        request_timeout_ms=10_000,
        reconnect_backoff_max_ms=1_000,
    )


@dataclass
class Replay:
    """Produce `records` to `topic` at `rate` events/s from a thread (idempotent producer, acks=all);
    `partition_of(i)` picks record i's partition (default: kafka-python's murmur2 of the key)."""

    bootstrap: str
    topic: str
    records: list[tuple[bytes, bytes]]
    rate: float
    partition_of: Callable[[int], int] | None = None
    sent: int = 0
    started: float = 0.0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Replay:
        threading.Thread(target=self._run, daemon=True, name="replay").start()
        return self

    def _run(self) -> None:
        producer = replay_producer(self.bootstrap)
        try:
            self.started = time.monotonic()
            for key, value in self.records:
                if self.stopping.is_set():
                    break
                self.paced()
                partition = None if self.partition_of is None else self.partition_of(self.sent)
                producer.send(self.topic, key=key, value=value, partition=partition)
                self.sent += 1
            producer.flush(timeout=300)
        except BaseException as exc:  # reported by wait()
            self.error = exc
        finally:
            producer.close()
            self.done.set()

    def stop(self) -> None:
        """Send no more records (those sent are flushed)."""
        self.stopping.set()

    def paced(self) -> None:
        """Sleep until the next record is due (the replay's rate)."""
        delay = self.started + self.sent / self.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def wait_sent(self, count: int, deadline_s: float) -> None:
        wait_for(lambda: self.sent >= count or self.done.is_set(), deadline_s, f"{count} events sent")
        self.check()

    def wait(self, deadline_s: float) -> None:
        wait_for(self.done.is_set, deadline_s, "the replay to finish")
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the replay producer failed: {self.error!r}")


@dataclass
class ConfluentReplay(Replay):
    """The same replay through librdkafka (confluent-kafka) with its default partitioner: CRC32 of the key
    (`consistent_random`), not murmur2, so most records land on another partition than their user's."""

    def _run(self) -> None:
        from confluent_kafka import KafkaException, Producer

        failures: list[str] = []

        def delivered(err, _msg) -> None:
            if err is not None:
                failures.append(str(err))

        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        try:
            self.started = time.monotonic()
            for key, value in self.records:
                self.paced()
                while True:
                    try:
                        producer.produce(self.topic, key=key, value=value, on_delivery=delivered)
                        break
                    except BufferError:  # local queue full: serve delivery reports, then retry
                        producer.poll(0.1)
                producer.poll(0)
                self.sent += 1
            left = producer.flush(300)
            if left or failures:
                raise KafkaException(f"{left} records undelivered, delivery errors: {failures[:3]}")
        except BaseException as exc:  # reported by wait()
            self.error = exc
        finally:
            self.done.set()


def counts_over_http(worker: WorkerProcess, users: list[str]) -> dict[str, dict[str, int]]:
    """Each user's counts as `GET /users/{user}/plays` answers them (routed to the owner)."""
    out = {}
    for user in users:
        status, body = worker.request(f"/users/{quote(user, safe='')}/plays")
        if status != 200:
            raise AssertionError(f"GET /users/{user}/plays -> {status}: {body}")
        out[user] = body["plays"]
    return out


def difference(expected: dict[str, dict[str, int]], got: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(lost, duplicated) streams of `got` against `expected`."""
    lost = duplicated = 0
    for user in set(expected) | set(got):
        want, have = expected.get(user, {}), got.get(user, {})
        for track in set(want) | set(have):
            delta = have.get(track, 0) - want.get(track, 0)
            lost += max(0, -delta)
            duplicated += max(0, delta)
    return lost, duplicated


def wait_for_exact_counts(
    worker: Callable[[], WorkerProcess], expected: dict[str, dict[str, int]], deadline_s: float
) -> float:
    """Wait until every user's counts over HTTP equal `expected`; returns the seconds it took."""
    started = time.monotonic()
    pending = sorted(expected)

    def settled():
        nonlocal pending
        try:
            got = counts_over_http(worker(), pending)
        except AssertionError:
            return False  # a worker is rebalancing: 503 for now
        pending = [u for u in pending if got[u] != expected[u]]
        return not pending

    try:
        wait_for(settled, deadline_s, "the workers' counts to equal the replayed input", interval_s=1.0)
    except AssertionError:
        lost, duplicated = difference(expected, counts_over_http(worker(), sorted(expected)))
        raise AssertionError(
            f"counts still differ from the input after {deadline_s:.0f} s: {lost} streams lost, "
            f"{duplicated} duplicated, {len(pending)} users wrong"
        ) from None
    return time.monotonic() - started


def changelog_counts(bootstrap: str, app_id: str) -> dict[str, dict[str, int]]:
    """Every user's counts as a model retrain would read them (the user-state changelog); none while the
    changelog holds no row yet (a fresh broker, before the first background fold-in writes one)."""
    try:
        snapshot = snapshot_counts(bootstrap, app_id, timeout_s=120)
    except EmptySnapshotError:
        return {}
    counts = snapshot.counts
    out: dict[str, dict[str, int]] = {}
    matrix = counts.matrix.tocsr()
    for row, user in enumerate(counts.user_ids):
        start, stop = matrix.indptr[row], matrix.indptr[row + 1]
        out[str(user)] = {
            str(counts.item_ids[j]): int(c) for j, c in zip(matrix.indices[start:stop], matrix.data[start:stop])
        }
    return {u: c for u, c in out.items() if c}


def wait_for_durable_counts(
    bootstrap: str, app_id: str, expected: dict[str, dict[str, int]], deadline_s: float
) -> float:
    """Wait until the user-state changelog holds exactly `expected` (rows reach it a background fold-in
    after the counts show over HTTP); returns the seconds it took. A duplicated stream fails at once
    (counts never go down); lost ones are waited for until the deadline."""
    started = time.monotonic()
    while True:
        lost, duplicated = difference(expected, changelog_counts(bootstrap, app_id))
        assert duplicated == 0, f"the changelog counts {duplicated} streams twice"
        if lost == 0:
            return time.monotonic() - started
        if time.monotonic() - started > deadline_s:
            raise AssertionError(f"the changelog still lacks {lost} streams {deadline_s:.0f} s after the counts")
        time.sleep(0.5)  # a fresh snapshot read per check: poll, with the deadline above


def unique_names() -> tuple[str, str]:
    """(topic prefix, app id) no other test uses."""
    prefix = f"fault-{uuid.uuid4().hex[:8]}-"
    return prefix, f"{prefix}app"
