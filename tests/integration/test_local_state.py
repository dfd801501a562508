"""A worker's local table state (the default store `playrec worker` picks: RocksDB) is a cache of the
changelog: stale state is dropped and restored, never crashes the worker, and valid state is resumed.

1. The README flow twice with a new broker in between (the crash a newcomer hit: faust's
   ConsistencyError at every start).
2. Topics deleted and recreated while the worker is stopped (caught by the recorded topic ids, and
   without them, by the offsets alone).
3. The user-state changelog emptied by retention while the worker is stopped: its counts are read
   again from plays, exactly.
4. A restart against the same broker after 50K plays: state intact, restore reads only what the
   changelog holds past the local offsets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from batch.user_state import changelog_topic
from playrec.devbroker import DevBroker
from stream.local_state import IDENTITY_FILE
from stream.replay import replay_events

from ..faults.harness import (
    PARTITIONS,
    Replay,
    counts_over_http,
    play_log,
    publish_model,
    unique_names,
    wait_for_durable_counts,
    wait_for_exact_counts,
)
from ..faults.test_exactly_once import both_ready
from .workers import ROOT, WorkerProcess, free_port, wait_for

pytestmark = pytest.mark.integration

DATA = Path(os.environ.get("PLAYREC_DATA", ROOT.parent / "shared" / "data"))
MOVIELENS = DATA / "ml-100k" / "u.data"
README_EVENTS = 5000
#: A restarted worker must be ready within this many seconds (issue: "ready within 60 s").
READY_S = 60


def _expected_replay(path: Path, limit: int) -> dict[str, dict[str, int]]:
    """The counts `playrec replay FILE --limit N` produces (every replayed event is a stream)."""
    counts: dict[str, Counter] = {}
    for n, (_key, value) in enumerate(replay_events(path)):
        if n == limit:
            break
        event = msgpack.unpackb(value)
        counts.setdefault(event["user"], Counter())[event["track"]] += 1
    return {user: dict(c) for user, c in counts.items()}


def _replay_cli(bootstrap: str, path: Path, limit: int) -> None:
    """`playrec replay FILE --limit N` as the README runs it."""
    command = [sys.executable, "-m", "playrec.cli", "replay", str(path), "--limit", str(limit), "--rate", "0"]
    subprocess.run(
        [*command, "--bootstrap", bootstrap, "--no-progress"],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )


def _ready_within(worker: WorkerProcess, deadline_s: float) -> float:
    started = time.monotonic()
    worker.wait_ready(deadline_s)
    return time.monotonic() - started


def test_readme_flow_twice_with_a_new_broker(tmp_path):
    """`playrec broker`, `playrec worker --store store`, `playrec replay u.data --limit 5000`; stop both;
    a new broker, the same worker command: ready, and it counts the second round exactly."""
    if not MOVIELENS.is_file():
        pytest.fail(f"{MOVIELENS} is missing: set PLAYREC_DATA to the folder holding ml-100k/", pytrace=False)
    expected = _expected_replay(MOVIELENS, README_EVENTS)
    store = publish_model(tmp_path)
    home = tmp_path / "xdg-state"  # the worker's default data dir lives under $XDG_STATE_HOME
    port = free_port()
    for round_ in (1, 2):
        broker = DevBroker(port=free_port())  # a fresh broker, as `playrec broker` always is
        bootstrap = broker.start()
        worker = WorkerProcess(
            bootstrap,
            store.root,
            "",
            "playrec",
            tmp_path / f"round{round_}",
            table_store=None,
            default_data_dir=True,
            port=port,
            env={"XDG_STATE_HOME": str(home)},
        )
        try:
            ready_s = _ready_within(worker, READY_S)
            _replay_cli(bootstrap, MOVIELENS, README_EVENTS)
            wait_for_exact_counts(lambda w=worker: w, expected, 120)
            wait_for_durable_counts(bootstrap, "playrec", expected, 60)  # the local store holds offsets now
            if round_ == 2:
                assert worker.metric("playrec_local_partitions_dropped") == 0  # the cluster check emptied it
                assert "local state in" in worker.tail(400) and "started clean" in worker.tail(400)
                print(f"\nsecond run on a new broker: ready {ready_s:.1f} s after start, counts exact")
        finally:
            worker.stop()
            broker.stop()
    state = home / "playrec" / f"playrec-{port}"
    assert (state / IDENTITY_FILE).is_file(), f"the default data dir {state} was not used"
    assert not (ROOT / ".playrec-worker").exists(), "the worker littered its working directory"


def _topics(prefix: str, app_id: str) -> list[str]:
    names = ["plays", "plays.dead-letter", "track-plays", "track-vectors", "track-takedowns", "model-updates"]
    return [prefix + n for n in names] + [changelog_topic(app_id), changelog_topic(app_id, "track-listeners")]


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics(topics, raise_errors=False)
        wait_for(lambda: not set(topics) & set(admin.list_topics()), 60, "the topics to be deleted")
    finally:
        admin.close()


def _round(bootstrap: str, prefix: str, n: int, seed: int) -> dict[str, dict[str, int]]:
    log = play_log(n, seed=seed)
    Replay(bootstrap, prefix + "plays", log.records, rate=20_000).start().wait(120)
    return log.expected


@pytest.mark.parametrize("identity", ["recorded", "lost"])
def test_topics_recreated_while_the_worker_is_stopped(kafka_bootstrap, tmp_path, identity):
    """Every topic deleted and recreated between two runs: the second run drops the old state (by the
    recorded topic ids, or, without the identity file, by the changelog offsets) and counts exactly."""
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    data_dir = tmp_path / "state"

    def start() -> WorkerProcess:
        return WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path, table_store=None, data_dir=data_dir)

    worker = start()
    try:
        worker.wait_ready(90)
        first = _round(kafka_bootstrap, prefix, 5000, seed=11)
        wait_for_exact_counts(lambda: worker, first, 120)
        wait_for_durable_counts(kafka_bootstrap, app_id, first, 60)
    finally:
        worker.stop()
    _delete_topics(kafka_bootstrap, _topics(prefix, app_id))
    if identity == "lost":
        (data_dir / IDENTITY_FILE).unlink()
    worker = start()
    try:
        ready_s = _ready_within(worker, READY_S)
        second = _round(kafka_bootstrap, prefix, 3000, seed=12)
        wait_for_exact_counts(lambda: worker, second, 120)
        everyone = sorted(set(first) | set(second))
        got = counts_over_http(worker, everyone)
        assert got == {u: second.get(u, {}) for u in everyone}, "state of the deleted topics survived"
        dropped = worker.metric("playrec_local_partitions_dropped")
        if identity == "lost":
            assert dropped >= 1, "the stale partitions were not dropped by their offsets"
        print(f"\ntopics recreated ({identity} identity): ready {ready_s:.1f} s, {dropped:.0f} partitions dropped")
    finally:
        worker.stop()


def _offsets(bootstrap: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        low, high = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        return {tp.partition: o for tp, o in low.items()}, {tp.partition: o for tp, o in high.items()}
    finally:
        consumer.close()


def _alter(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        admin.close()


def test_changelog_emptied_by_retention(tmp_path):
    """Retention empties the user-state changelog while the worker is stopped: the restarted worker is
    ready, reads its partitions' plays again (stream/source_replay.py) and every user's counts are exact
    again, over HTTP and in the changelog; new plays count exactly on top; a restart after the restore
    does not read the plays again."""
    broker = DevBroker(port=free_port())  # its retention check runs every second (playrec.devbroker)
    bootstrap = broker.start()
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    data_dir = tmp_path / "state"
    topic = changelog_topic(app_id)

    def start() -> WorkerProcess:
        return WorkerProcess(bootstrap, store.root, prefix, app_id, tmp_path, table_store=None, data_dir=data_dir)

    try:
        worker = start()
        try:
            worker.wait_ready(90)
            first = _round(bootstrap, prefix, 5000, seed=21)
            wait_for_exact_counts(lambda: worker, first, 120)
            wait_for_durable_counts(bootstrap, app_id, first, 60)
        finally:
            worker.stop()
        _alter(bootstrap, topic, {"cleanup.policy": "delete", "retention.ms": "1000", "segment.ms": "1000"})

        def emptied() -> bool:
            low, high = _offsets(bootstrap, topic)
            return all(low[p] == high[p] for p in low) and sum(high.values()) > 0

        wait_for(emptied, 120, f"retention to empty {topic}", interval_s=0.5)
        _alter(bootstrap, topic, {"cleanup.policy": "compact", "retention.ms": str(7 * 86_400_000)})
        worker = start()
        try:
            ready_s = _ready_within(worker, READY_S)
            assert worker.metric("playrec_local_partitions_dropped") >= 1
            restore_s = wait_for_exact_counts(lambda: worker, first, 120)
            wait_for(
                lambda: worker.metric("playrec_partitions_restored_from_source") == PARTITIONS,
                60,
                "every emptied partition's restore to be recorded",
            )
            second = _round(bootstrap, prefix, 3000, seed=22)
            both = _merged(first, second)
            wait_for_exact_counts(lambda: worker, both, 120)
            wait_for_durable_counts(bootstrap, app_id, both, 60)
        finally:
            worker.stop()
        worker = start()  # restored and recorded: this start reads nothing again
        try:
            _ready_within(worker, READY_S)
            wait_for_exact_counts(lambda: worker, both, 120)
            assert worker.metric("playrec_partitions_restored_from_source") == 0
            assert worker.metric("playrec_partitions_restoring_from_source") == 0
        finally:
            worker.stop()
        print(
            f"\nchangelog emptied by retention: ready {ready_s:.1f} s, {len(first)} users' counts restored from "
            f"plays {restore_s:.1f} s later, exact; a later restart reads nothing again"
        )
    finally:
        broker.stop()


def test_changelog_emptied_while_the_workers_run(kafka_bootstrap, tmp_path):
    """Retention empties the user-state changelog while a worker holds every row (found by the lifecycle
    test: a worker that restored partitions just before the deletion served exact counts, but the
    changelog lacked their rows and a retrain's snapshot lost 541 streams). A second worker joins: the
    partitions it takes are restored from plays, those the first keeps are detected too, and the
    changelog, not only the answers, holds every count again."""
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    topic = changelog_topic(app_id)
    first = WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / "a", table_store=None)
    second = None
    try:
        first.wait_ready(90)
        plays = _round(kafka_bootstrap, prefix, 5000, seed=31)
        wait_for_exact_counts(lambda: first, plays, 120)
        wait_for_durable_counts(kafka_bootstrap, app_id, plays, 60)
        _, end = _offsets(kafka_bootstrap, topic)
        _alter(kafka_bootstrap, topic, {"cleanup.policy": "compact,delete"})
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_records({TopicPartition(topic, p): offset for p, offset in end.items()})
        finally:
            admin.close()
        _alter(kafka_bootstrap, topic, {"cleanup.policy": "compact"})
        second = WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / "b", table_store=None)
        wait_for(lambda: both_ready(first, second), 120, "two workers splitting the partitions")
        wait_for(
            lambda: (
                first.metric("playrec_partitions_restored_from_source")
                + second.metric("playrec_partitions_restored_from_source")
                == PARTITIONS
            ),
            90,
            "every emptied partition restored",
        )
        durable_s = wait_for_durable_counts(kafka_bootstrap, app_id, plays, 60)
        wait_for_exact_counts(lambda: second, plays, 60)
        print(f"\nchangelog emptied while the workers run: every count durable {durable_s:.1f} s after the restores")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _merged(*rounds: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for counts in rounds:
        for user, tracks in counts.items():
            out.setdefault(user, Counter()).update(tracks)
    return {user: dict(c) for user, c in out.items()}


def _persisted_offsets(data_dir: Path, table: str) -> dict[int, int]:
    """The changelog offset each local RocksDB partition store of `table` recorded (faust's offset key)."""
    from rocksdict import AccessType, Options, Rdict

    out = {}
    for path in data_dir.rglob(f"{table}-*.db"):
        partition = int(path.name[len(table) + 1 : -3])
        db = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            raw = db.get(b"__faust\x00offset__")
        finally:
            db.close()
        if raw is not None:
            out[partition] = int(raw)
    return out


def test_restart_against_the_same_broker_resumes_local_state(kafka_bootstrap, tmp_path):
    """Worker a counts 50K plays and stops; worker b (its own data dir) restores everything, counts 5K
    more and stops; a's restart reads only the changelog records past its local offsets (b's), not the
    whole changelog, and every count is intact."""
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    topic = changelog_topic(app_id)

    def start(name: str) -> WorkerProcess:
        return WorkerProcess(
            kafka_bootstrap, store.root, prefix, app_id, tmp_path, table_store=None, data_dir=tmp_path / name
        )

    def restored(worker: WorkerProcess) -> float:
        return worker.metric('playrec_changelog_records_restored{table="user-state"}')

    expected: dict[str, dict[str, int]] = {}

    def count(worker: WorkerProcess, n: int, seed: int) -> None:
        for user, tracks in _round(kafka_bootstrap, prefix, n, seed).items():
            mine = expected.setdefault(user, {})
            for track, c in tracks.items():
                mine[track] = mine.get(track, 0) + c
        wait_for_exact_counts(lambda: worker, expected, 180)
        wait_for_durable_counts(kafka_bootstrap, app_id, expected, 60)

    a = start("a")
    try:
        a.wait_ready(90)
        count(a, 50_000, seed=31)
    finally:
        a.stop()
    b = start("b")
    try:
        full_s = _ready_within(b, READY_S)
        full = restored(b)
        count(b, 5000, seed=32)
    finally:
        b.stop()
    persisted = _persisted_offsets(tmp_path / "a", "user-state")
    low, high = _offsets(kafka_bootstrap, topic)
    written = sum(high.values()) - sum(low.values())
    past = sum(high[p] - 1 - persisted.get(p, low[p] - 1) for p in high)
    assert 0 < past < written
    a = start("a")
    try:
        ready_s = _ready_within(a, READY_S)
        assert a.metric("playrec_local_partitions_dropped") == 0
        assert restored(a) <= past, f"restored {restored(a):.0f} changelog records, {past} lie past the local offsets"
        assert counts_over_http(a, sorted(expected)) == expected
        print(
            f"\nrestart on local state: ready {ready_s:.1f} s, restored {restored(a):.0f} of {written} changelog "
            f"records ({past} past the local offsets); from scratch: ready {full_s:.1f} s, restored {full:.0f}"
        )
    finally:
        a.stop()
