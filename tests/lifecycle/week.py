"""A week of production, compressed (#21): the scenario and its invariants, shared by the lifecycle test
(`tests/lifecycle/test_week.py`, in `make test`) and larger runs (`Week(scale=...)`).

Day 0: the README flow rehearsed once on a first broker (`playrec train --plays` on Last.fm 2K, two
workers on the default table store, a few hundred plays counted, workers and broker stopped), then run
for real on a new broker (a new Kafka cluster) with the workers' data dirs left from the rehearsal.
Each day: a slice of plays from two producers (kafka-python, murmur2 partitioner; confluent-kafka,
its default CRC32 partitioner), with file users, brand-new listeners, new tracks and one hit whose
listeners play it first; two take-downs mid-day; HTTP queries at a steady rate all along; the day's
fault; at night `playrec retrain --once --from-kafka --announce` while plays keep arriving, and the
workers hot-swap. After every step the invariants are checked against the producers' own ground
truth; a violation raises `InvariantError` naming the step, the user or track and the evidence.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from batch.model_store import ModelStore
from batch.plays import read_play_counts
from batch.user_state import changelog_topic
from playrec.cli import main as playrec
from playrec.devbroker import DevBroker
from stream.events import encode_play
from stream.internal_records import decode_track_vector
from stream.settings import Topics

from ..faults.harness import (
    ConfluentReplay,
    Replay,
    counts_over_http,
    difference,
    unique_names,
    wait_for_durable_counts,
)
from ..faults.test_exactly_once import both_ready
from ..integration.workers import WorkerProcess, free_port, wait_for

MODEL_FLAGS = ["--factors", "16", "--iterations", "6", "--no-index", "--no-progress"]
TOKEN = "lifecycle-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MS_PLAYED = 200_000  # every play of the scenario is a stream (>= 30 s)
SEARCHABLE_S = 10.0  # a new track with 5 listeners that have vectors is searchable within this
#: Share of the hit's fans its vector is solved from: every fan has a vector by the end of the day, so all
#: of them count (it was 0.5 while a kill -9 between a batch's listener rows and its statistics dropped
#: listeners for good, docs/RELIABILITY.md).
HIT_COUNTED = 1.0
#: Slowest progress (plays of the topic's history per second) accepted from a worker that restores
#: changelog partitions retention emptied: it reads every play of those partitions again
#: (stream/source_replay.py), so the repair takes time proportional to the history, not to the day.
RESTORE_RATE = 400.0
REHEARSAL_USERS = 100  # history users who play 3 tracks each in the rehearsal (every partition gets some)


class InvariantError(AssertionError):
    """An invariant of the lifecycle failed: the message names the step and the evidence."""


@dataclass
class DaySlice:
    """One day's plays, each user's plays through one producer in order, and what they must produce."""

    kafka_python: list[tuple[bytes, bytes]]
    confluent: list[tuple[bytes, bytes]]
    new_tracks: list[str]
    hit: str
    listeners: list[str]  # stream users first seen today
    fans: int  # of the hit (among `listeners`), each plays it first


@dataclass
class Truth:
    """The producers' ground truth: every stream sent, per user and track."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    total: int = 0

    def add(self, user: str, track: str) -> None:
        per_user = self.counts.setdefault(user, {})
        per_user[track] = per_user.get(track, 0) + 1
        self.total += 1


@dataclass
class Queries:
    """HTTP queries at a steady rate against both workers from a thread; records every status and
    every violation (a 500, a 5xx outside a fault window, a taken-down track served after it applied)."""

    week: Week
    rate: float = 20.0
    statuses: Counter = field(default_factory=Counter)
    unavailable_in_faults: int = 0
    violations: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Queries:
        self.thread = threading.Thread(target=self._run, daemon=True, name="queries")
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)

    def _run(self) -> None:
        rng = random.Random(7)
        while not self.stop.wait(1.0 / self.rate):
            week = self.week
            workers = [w for w in week.workers.values() if w.proc.poll() is None]
            if not workers:
                continue
            worker = rng.choice(workers)
            banned = dict(week.banned)  # taken-down tracks that had applied when the request was sent
            in_fault = week.fault_window
            kind = rng.random()
            if kind < 0.5:
                user = rng.choice(week.seen_users)
                path, method, body = f"/users/{quote(user, safe='')}/recommendations?k=10", "GET", None
            elif kind < 0.8:
                track = rng.choice(week.popular[:50])
                path, method, body = f"/tracks/{quote(track, safe='')}/similar?k=10", "GET", None
            else:
                tracks = rng.sample(week.popular[:200], 3)
                path, method, body = "/recommendations?k=10", "POST", json.dumps({"tracks": tracks}).encode()
            status, answer = worker.request(path, method, body)
            self.statuses[status] += 1
            if status >= 500 or status == 0:
                if status == 500 or not (in_fault or week.fault_window):
                    self.violations.append(f"{method} {path} on :{worker.port} -> {status} {answer!r:.200}")
                else:
                    self.unavailable_in_faults += 1
                continue
            if status == 200 and isinstance(answer, dict):
                served = {item["track"] for item in answer.get("items", [])}
                for track in served & set(banned):
                    self.violations.append(
                        f"{method} {path} on :{worker.port} served taken-down {track!r} "
                        f"(applied {time.monotonic() - banned[track]:.1f} s before)"
                    )


class Week:
    """The scenario: `run(days)` drives it and raises InvariantError on the first violation."""

    def __init__(self, root: Path, lastfm: Path, scale: float = 1.0, seed: int = 0, log=print) -> None:
        self.root, self.lastfm, self.scale, self.seed, self.log = root, lastfm, scale, seed, log
        self.rng = random.Random(seed)
        self.truth = Truth()
        self.banned: dict[str, float] = {}  # track -> monotonic time its take-down had applied everywhere
        self.fault_window = False
        self.fault_started = 0.0  # time.monotonic() of the latest fault
        self.workers: dict[str, WorkerProcess] = {}
        self.figures: list[dict[str, Any]] = []
        self.prefix, self.app = unique_names()
        self.broker = DevBroker(data_dir=root / "kafka", port=free_port())
        self.bootstrap = ""
        self.store = ModelStore(root / "store")
        file_counts = read_play_counts(lastfm)
        self.file_users = [str(u) for u in file_counts.user_ids]
        popularity = file_counts.matrix.getnnz(axis=0)
        order = sorted(range(len(popularity)), key=lambda j: (-popularity[j], j))
        self.popular = [str(file_counts.item_ids[j]) for j in order[:500]]
        m, items = file_counts.matrix, file_counts.item_ids
        #: each history user's tracks, most played first: stream listeners play like one of them
        self.profiles = [
            [
                str(items[j])
                for j in m.indices[m.indptr[r] : m.indptr[r + 1]][(-m.data[m.indptr[r] : m.indptr[r + 1]]).argsort()]
            ]
            for r in range(m.shape[0])
        ]
        self.taste: dict[str, list[str]] = {}  # stream listener -> the profile they play like
        self.stream_users: list[str] = []
        self.seen_users = list(self.file_users)
        self.model_users = len(self.file_users)
        self.token_file = root / "admin-token"
        self.token_file.write_text(TOKEN)

    # ------------------------------------------------------------------------------------ scaffold

    def start(self) -> None:
        """Day 0: the rehearsal, then the README flow again on a new broker over the same worker data dirs:
        both workers split the partitions and serve none of the rehearsal's counts."""
        started = time.monotonic()
        rehearsed = self.rehearse()
        rehearsal_s = time.monotonic() - started
        self.bootstrap = self.broker.start()
        self._day0("day 0")
        ready_s = time.monotonic() - started - rehearsal_s
        self.log(f"lifecycle day 0: rehearsal {rehearsal_s:.1f} s, then ready on a new broker in {ready_s:.1f} s")
        for name, worker in self.workers.items():
            got = {u: c for u, c in counts_over_http(worker, rehearsed).items() if c}
            if got:
                user = next(iter(got))
                raise InvariantError(
                    f"day 0: worker {name} on a new broker serves {len(got)} users' counts of the rehearsal "
                    f"(gone with its broker), e.g. {user!r}: {got[user]}"
                )

    def rehearse(self) -> list[str]:
        """The day-0 flow once on a first broker, as a newcomer runs the README before running it again:
        train, two workers on their data dirs, REHEARSAL_USERS x 3 plays counted, workers then broker
        stopped. Its plays are gone with that broker (not in the truth). Returns the users who played."""
        broker = DevBroker(data_dir=self.root / "kafka-rehearsal", port=free_port())
        self.bootstrap = broker.start()
        try:
            self._day0("day 0 rehearsal", "rehearsal")
            rng = random.Random(self.seed + 1)  # the days' plays stay those of `self.rng`
            users = rng.sample(self.file_users, REHEARSAL_USERS)
            plays, expected = [], Truth()
            for user in users:
                for track in rng.sample(self.popular[:100], 3):
                    plays.append(encode_play(user, track, int(time.time() * 1000), MS_PLAYED, _eid()))
                    expected.add(user, track)
            Replay(self.bootstrap, self.prefix + "plays", plays, 2000.0).start().wait(120)
            try:  # durable: the workers' local stores hold changelog offsets of this cluster
                wait_for_durable_counts(self.bootstrap, self.app, expected.counts, 60)
            except AssertionError as exc:
                raise InvariantError(f"day 0 rehearsal: {exc}") from None
        finally:
            for worker in self.workers.values():
                worker.stop()
            self.workers = {}
            broker.stop()
        return users

    def _day0(self, step: str, logs: str = "worker") -> None:
        """`playrec train --plays` into the store, then workers a and b on their data dirs, ready."""
        args = ["train", "--plays", str(self.lastfm), "--out", str(self.store.root), "--holdout", "0", *MODEL_FLAGS]
        if playrec(args) != 0:
            raise InvariantError(f"{step}: playrec train --plays failed")
        for name in "ab":
            self.workers[name] = self._worker(name, logs)
        try:
            wait_for(self._split, 180, f"{step}: two workers splitting the partitions")
        except AssertionError as exc:
            exited = [(n, w) for n, w in self.workers.items() if w.proc.poll() is not None]
            if not exited:
                raise InvariantError(f"{step}: {exc}") from None
            name, worker = exited[0]
            raise InvariantError(
                f"{step}: worker {name} exited with {worker.proc.returncode}: {_last_error(worker.tail(400))} "
                f"(log {worker.log_path})"
            ) from None

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.broker.stop()

    def _worker(self, name: str, logs: str = "worker") -> WorkerProcess:
        """Worker `name` on the default table store with its own data dir, kept across restarts and
        from the rehearsal's broker to the real one (its log under `logs-name`)."""
        return WorkerProcess(
            self.bootstrap,
            self.store.root,
            self.prefix,
            self.app,
            self.root / f"{logs}-{name}",
            table_store=None,
            data_dir=self.root / f"data-{name}",
            session_timeout=6,
            admin_token_file=self.token_file,
        )

    def _split(self) -> bool:
        return both_ready(self.workers["a"], self.workers["b"])

    # ---------------------------------------------------------------------------------------- days

    def day_slice(self, day: int) -> DaySlice:
        """Seeded plays of one day; the ground truth is updated as they are built."""
        rng, n = self.rng, self.scale
        per_user: dict[str, list[str]] = {}

        def play(user: str, track: str) -> None:
            per_user.setdefault(user, []).append(track)
            self.truth.add(user, track)

        def likes(user: str, k: int) -> list[str]:
            """k tracks of the user's taste (a history user's profile), its head more likely."""
            profile = self.taste[user]
            head = profile[: max(k, min(len(profile), 20))]
            return rng.sample(head, min(k, len(head)))

        for row in rng.sample(range(len(self.file_users)), int(150 * n)):
            self.taste.setdefault(self.file_users[row], self.profiles[row])
            for track in likes(self.file_users[row], 3):
                play(self.file_users[row], track)
        for user in rng.sample(self.stream_users, min(len(self.stream_users), int(50 * n))):
            for track in likes(user, 2):
                play(user, track)
        listeners = [f"d{day}-new-{i}" for i in range(int(100 * n))]
        hit, fans = f"d{day}-hit", [f"d{day}-fan-{i}" for i in range(int(3000 * n))]
        for user in listeners:  # stream listeners play like a history user picked at random
            self.taste[user] = self.profiles[rng.randrange(len(self.profiles))]
        # the hit is a new release by a popular artist: its fans play like that artist's listeners
        artist = self.popular[10 + day]
        audience = [p for p in self.profiles if artist in p]
        for user in fans:
            self.taste[user] = audience[rng.randrange(len(audience))]
        for user in listeners:
            for track in likes(user, 4):
                play(user, track)
        new_tracks = [f"d{day}-track-{j}" for j in range(int(200 * n))]
        for track in new_tracks:  # six listeners each who already have vectors (history users)
            for user in rng.sample(self.file_users, 6):
                play(user, track)
        for user in fans:  # the hit first, then three tracks of their taste
            play(user, hit)
        for user in fans:
            for track in likes(user, 3):
                play(user, track)
        listeners += fans
        streams: tuple[list, list] = ([], [])
        ts = int(time.time() * 1000)
        # one producer per user keeps each user's plays in order; interleave users round-robin
        queues = [(user, list(tracks)) for user, tracks in per_user.items()]
        rng.shuffle(queues)
        fan_set = set(fans)
        fan_first = [q for q in queues if q[0] in fan_set]
        others = [q for q in queues if q[0] not in fan_set]
        for user, tracks in fan_first:  # every fan's first play (the hit) goes out before the rest
            streams[zlib.crc32(user.encode()) % 2].append(encode_play(user, tracks.pop(0), ts, MS_PLAYED, _eid()))
        pending = others + fan_first
        while pending:
            rest = []
            for user, tracks in pending:
                if tracks:
                    streams[zlib.crc32(user.encode()) % 2].append(
                        encode_play(user, tracks.pop(0), ts, MS_PLAYED, _eid())
                    )
                    rest.append((user, tracks))
            pending = rest
        return DaySlice(streams[0], streams[1], new_tracks, hit, listeners, len(fans))

    def run_day(self, day: int, fault: str, queries: Queries) -> None:
        today = self.day_slice(day)
        total = len(today.kafka_python) + len(today.confluent)
        rate = 800.0
        started = time.monotonic()
        plays = self.prefix + "plays"
        replays = [
            Replay(self.bootstrap, plays, today.kafka_python, rate).start(),
            ConfluentReplay(self.bootstrap, plays, today.confluent, rate).start(),
        ]
        self.seen_users = self.seen_users + today.listeners  # queried from now on
        sent = lambda: sum(r.sent for r in replays)  # noqa: E731
        wait_for(lambda: sent() >= total * 2 // 5, 300, f"day {day}: 40% of the plays sent")
        fault_s = self.fault(day, fault)
        wait_for(lambda: sent() >= total // 2 or all(r.done.is_set() for r in replays), 300, f"day {day}: half sent")
        takedowns = [self.popular[day], today.new_tracks[0]]
        self.take_down(day, takedowns)
        for replay in replays:
            replay.wait(300)
        replayed = time.monotonic()
        self.stream_users += today.listeners
        repaired = self.wait_restores(f"day {day}")
        self.check_counts(f"day {day}")
        searchable_s = self.check_new_tracks(f"day {day}", [*today.new_tracks[1:], today.hit], replayed)
        self.check_hit(f"day {day}", today.hit, today.fans)
        self.check_personal(f"day {day}")
        self.check_queries(f"day {day}", queries)
        figures = {
            "day": day,
            "plays": total,
            "fault": fault,
            "fault_recovery_s": round(fault_s, 1),
            # an emptied changelog: seconds from the fault to its partitions restored from `plays`
            "repair_s": round(repaired - self.fault_started, 1) if fault.startswith("retention-") else None,
            "day_s": round(time.monotonic() - started, 1),
            "new_tracks_searchable_s": round(searchable_s, 1),
            "worker_rss_mib": self.rss_mib(),
            "fold_in_p99_s": self.fold_in_p99(),
        }
        self.night(day, queries, figures)
        self.figures.append(figures)
        self.log(f"lifecycle day {day}: {json.dumps(figures)}")

    # -------------------------------------------------------------------------------------- faults

    def fault(self, day: int, fault: str) -> float:
        """Inject the day's fault and wait until both workers serve again; returns the seconds it took."""
        started = self.fault_started = time.monotonic()
        self.fault_window = True
        try:
            if fault.startswith("kill-"):
                name = fault.removeprefix("kill-")
                self.workers[name].kill()
                self.workers[name] = self._worker(name)
            elif fault.startswith("retention-"):
                self._retention_fault(day, fault.removeprefix("retention-"))
            elif fault == "broker-restart":
                self.broker.stop()
                time.sleep(3.0)  # the outage itself, not a synchronisation
                if self.broker.start() != self.bootstrap:
                    raise InvariantError(f"day {day}: the broker came back on another address")
                for name, worker in self.workers.items():
                    if worker.proc.poll() is not None:
                        raise InvariantError(f"day {day}: worker {name} exited in the outage:\n{worker.tail()}")
            else:
                raise ValueError(f"unknown fault {fault!r}")
            wait_for(self._split, 180, f"day {day}: both workers ready after {fault}")
        finally:
            self.fault_window = False
        return time.monotonic() - started

    def _retention_fault(self, day: int, name: str) -> None:
        """Worker `name` is killed and retention empties its user-state changelog partitions before it comes
        back: the topic briefly allows deletion (`cleanup.policy=compact,delete`, as a misconfigured cluster
        has it) and the partitions' records are deleted up to their end (DeleteRecords, what retention does
        to expired segments, at once), then the policy is compact again."""
        partitions = self.workers[name].get("/ready")["partitions"]
        self.workers[name].kill()
        topic = changelog_topic(self.app)
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="lifecycle-retention")
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap)
        try:
            tps = [TopicPartition(topic, p) for p in partitions]
            end = consumer.end_offsets(tps)
            policy = lambda value: ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": value})  # noqa: E731
            admin.alter_configs([policy("compact,delete")])  # the whole config: the topic has no other override
            try:
                admin.delete_records({tp: end[tp] for tp in tps})
            finally:
                admin.alter_configs([policy("compact")])
            emptied = consumer.beginning_offsets(tps)
            if any(emptied[tp] != end[tp] for tp in tps):
                raise InvariantError(f"day {day}: DeleteRecords left {topic} at {emptied}, not {end}")
        finally:
            consumer.close()
            admin.close()
        self.log(f"lifecycle day {day}: emptied {topic} partitions {partitions} (up to {sorted(end.values())})")
        self.workers[name] = self._worker(name)

    def take_down(self, day: int, tracks: list[str]) -> None:
        admin = self.workers["a"]
        for track in tracks:
            status, body = admin.request(
                f"/admin/tracks/{quote(track, safe='')}/takedown", "PUT", b'{"reason": "lifecycle"}', AUTH
            )
            if status != 202:
                raise InvariantError(f"day {day}: take-down of {track!r} answered {status} {body}")
        for track in tracks:

            def applied(t: str = track) -> bool:
                return all(w.request(f"/tracks/{quote(t, safe='')}/similar")[0] == 404 for w in self.workers.values())

            wait_for(applied, 60, f"day {day}: the take-down of {track!r} on both workers")
            self.banned[track] = time.monotonic()

    # ---------------------------------------------------------------------------------- invariants

    def wait_restores(self, step: str) -> float:
        """Wait until no worker is restoring changelog partitions from their source topics (`/ready`
        lists them), within ``60 s + the plays sent so far / RESTORE_RATE``; returns the moment it
        happened (time.monotonic()). Counts are exact in the changelog only after a restore."""
        deadline_s = 60.0 + self.truth.total / RESTORE_RATE
        restoring: dict[str, list[int]] = {}

        def done() -> bool:
            restoring.clear()
            for name, worker in self.workers.items():
                busy = worker.get("/ready").get("restoring") or []
                if busy:
                    restoring[name] = busy
            return not restoring

        try:
            wait_for(done, deadline_s, "restores from the source topics", interval_s=0.5)
        except AssertionError:
            raise InvariantError(
                f"{step}: still restoring changelog partitions from plays {deadline_s:.0f} s after the day's "
                f"plays ({restoring}; {self.truth.total:,} plays sent in all)"
            ) from None
        return time.monotonic()

    def check_counts(self, step: str) -> None:
        """Every play counted exactly once: the changelog (what a retrain reads) equals the truth, and
        a sample of users over HTTP from both workers."""
        expected = self.truth.counts
        self.check_dead_letters(step)
        try:
            wait_for_durable_counts(self.bootstrap, self.app, expected, 120)
        except AssertionError as exc:
            self.check_dead_letters(step)
            raise InvariantError(f"{step}: counts differ from the producers' truth: {exc}") from None
        sample = self.rng.sample(sorted(expected), min(300, len(expected)))
        for name, worker in self.workers.items():
            got = counts_over_http(worker, sample)
            lost, duplicated = difference({u: expected[u] for u in sample}, got)
            if lost or duplicated:
                wrong = next(u for u in sample if got[u] != expected[u])
                raise InvariantError(
                    f"{step}: worker {name} serves {lost} streams lost, {duplicated} duplicated; "
                    f"e.g. {wrong!r}: {got[wrong]} vs {expected[wrong]}"
                )

    def check_dead_letters(self, step: str) -> None:
        """Nothing is dead-lettered: every record of the scenario is valid, whichever producer sent it."""
        records = self._read_topic(Topics(self.prefix).dead_letter)
        if records:
            headers = {k: v.decode("utf-8", "replace") for k, v in records[0].headers}
            raise InvariantError(
                f"{step}: {len(records)} records dead-lettered, e.g. {records[0].key!r} from {headers.get('source')}: "
                f"{headers.get('reason')}"
            )

    def check_hit(self, step: str, hit: str, fans: int) -> None:
        """The hit counts its fans: they play it first (before they have a vector), and each counts for it
        once their first fold-in gives them one, so its latest vector (on `track-vectors`) is solved from
        all of them (at least HIT_COUNTED) within SEARCHABLE_S (after the new tracks were searchable)."""
        topic = Topics(self.prefix).track_vectors

        def counted() -> int:
            listeners = 0
            for record in self._read_topic(topic):
                solved, _ = decode_track_vector(record.value)
                if solved is not None and solved.track == hit:
                    listeners = solved.listeners  # (one partition per key: in offset order)
            return listeners

        latest = [0]

        def enough() -> bool:
            latest[0] = counted()
            return latest[0] >= HIT_COUNTED * fans

        try:
            wait_for(enough, SEARCHABLE_S, f"{hit} counting its fans", interval_s=0.5)
        except AssertionError:
            raise InvariantError(
                f"{step}: the hit {hit!r} is solved from {latest[0]} of its {fans} fans {SEARCHABLE_S:.0f} s after "
                f"the new tracks were searchable (every fan has a vector; at least {HIT_COUNTED:.0%} must count)"
            ) from None

    def _read_topic(self, topic: str) -> list[Any]:
        """Every record of `topic` now (each partition from its start to its end offset)."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        try:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            ends = consumer.end_offsets(tps) if tps else {}
            tps = [tp for tp in tps if ends[tp]]
            if not tps:
                return []
            consumer.assign(tps)
            consumer.seek_to_beginning()
            records: list[Any] = []

            def done() -> bool:
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(batch)
                return all(consumer.position(tp) >= ends[tp] for tp in tps)

            wait_for(done, 60, f"the records of {topic}", interval_s=0)
            return records
        finally:
            consumer.close()

    def check_new_tracks(self, step: str, tracks: list[str], since: float) -> float:
        """Every new track (5+ listeners with vectors) and the hit are searchable on both workers within
        SEARCHABLE_S of the replay's end (the take-down's track excluded); returns the seconds it took."""
        pending = {(name, t) for name in self.workers for t in tracks if t not in self.banned}

        def searchable() -> bool:
            for name, track in sorted(pending):
                if self.workers[name].request(f"/tracks/{quote(track, safe='')}/similar?k=5")[0] == 200:
                    pending.discard((name, track))
            return not pending

        try:
            wait_for(searchable, SEARCHABLE_S, "new tracks searchable", interval_s=0.5)
        except AssertionError:
            name, track = sorted(pending)[0]
            raise InvariantError(
                f"{step}: {len(pending)} (worker, new track) pairs not searchable {SEARCHABLE_S:.0f} s after the "
                f"replay ({', '.join(f'{t} on {n}' for n, t in sorted(pending)[:6])}), e.g. {track!r} on worker "
                f"{name}: {self.workers[name].request(f'/tracks/{track}/similar')}"
            ) from None
        return time.monotonic() - since

    def check_personal(self, step: str) -> None:
        """Every listener ever seen (history or stream) gets personal recommendations; a sample of
        stream listeners (all of today's hit fans among them) and of history users, on both workers."""
        sample = self.rng.sample(self.stream_users, min(150, len(self.stream_users)))
        sample += self.rng.sample(self.file_users, 50)
        for user in sample:
            worker = self.workers["ab"[zlib.crc32(user.encode()) % 2]]

            def answered(u: str = user, w: WorkerProcess = worker) -> dict | None:
                status, body = w.request(f"/users/{quote(u, safe='')}/recommendations?k=10")
                return body if status == 200 and body.get("source") != "popularity" else None

            try:
                body = wait_for(answered, 10, f"{user}'s personal recommendations", interval_s=0.5)
            except AssertionError:
                got = worker.request(f"/users/{quote(user, safe='')}/recommendations?k=10")
                raise InvariantError(f"{step}: {user!r} gets no personal recommendations: {got}") from None
            banned = {i["track"] for i in body["items"]} & set(self.banned)
            if banned:
                raise InvariantError(f"{step}: {user!r} was recommended taken-down {sorted(banned)}")

    def check_queries(self, step: str, queries: Queries) -> None:
        if queries.violations:
            raise InvariantError(f"{step}: {len(queries.violations)} bad answers, e.g. {queries.violations[:3]}")

    # ----------------------------------------------------------------------------------------- night

    def night(self, day: int, queries: Queries, figures: dict[str, Any]) -> None:
        """`playrec retrain --once --from-kafka --announce` while plays keep arriving; both workers swap."""
        before = self.store.current_version()
        late = []
        for user in self.rng.sample(self.file_users, int(100 * self.scale)):
            track = self.rng.choice(self.popular)
            late.append(encode_play(user, track, int(time.time() * 1000), MS_PLAYED, _eid()))
            self.truth.add(user, track)
        replay = Replay(self.bootstrap, self.prefix + "plays", late, 50.0).start()
        started = time.monotonic()
        args = ["retrain", "--once", "--from-kafka", self.bootstrap, "--app-id", self.app]
        args += ["--out", str(self.store.root), "--announce", "--topic-prefix", self.prefix, *MODEL_FLAGS]
        if playrec(args) != 0:
            raise InvariantError(f"night {day}: playrec retrain --once failed")
        version = self.store.current_version()
        if version == before:
            report = self.store.load(before).path / "report.json"
            raise InvariantError(f"night {day}: the retrain kept the live model ({report}): strictly more data")
        model = self.store.load(version)
        users = set(model.user_ids.tolist())
        missing = [u for u in self.seen_users if u not in users]
        if missing or len(users) < self.model_users:
            raise InvariantError(
                f"night {day}: model {version} has {len(users)} users (before {self.model_users}); "
                f"{len(missing)} listeners ever seen are missing, e.g. {missing[:3]}"
            )
        self.model_users = len(users)
        wait_for(
            lambda: all(w.get("/ready")["version"] == version for w in self.workers.values()),
            120,
            f"night {day}: both workers on {version}",
        )
        replay.wait(120)
        figures["retrain_s"] = round(time.monotonic() - started, 1)
        figures["model_users"] = len(users)
        self.check_counts(f"night {day}")
        self.check_personal(f"night {day}")
        self.check_queries(f"night {day}", queries)

    # --------------------------------------------------------------------------------------- figures

    def rss_mib(self) -> list[int]:
        out = []
        for worker in self.workers.values():
            with open(f"/proc/{worker.proc.pid}/status") as f:
                out += [int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:")]
        return out

    def fold_in_p99(self) -> float | None:
        """p99 of the background fold-in's duration (the freshness of a user's vector), over both
        workers' histograms since they started (bucket upper bound)."""
        buckets: Counter = Counter()
        for worker in self.workers.values():
            status, text = worker.request("/metrics")
            for line in str(text).splitlines() if status == 200 else []:
                if line.startswith("playrec_fold_in_seconds_bucket{"):
                    le = line.split('le="', 1)[1].split('"', 1)[0]
                    buckets[float(le)] += float(line.rsplit(" ", 1)[1])
        total = buckets.get(float("inf"), 0.0)
        if not total:
            return None
        return next(le for le in sorted(buckets) if buckets[le] >= 0.99 * total)


def _eid() -> str:
    return uuid.uuid4().hex


def _last_error(log: str) -> str:
    """The last exception a worker's log shows (its line and the next), else the log's last line."""
    lines = log.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[\w.]+(Error|Exception): ", lines[i]):
            return " ".join(line.strip() for line in lines[i : i + 2])
    return lines[-1] if lines else "(empty log)"
