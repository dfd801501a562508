"""End-to-end checks of the faust ingest fast path (stream/ingest.py) on a real broker.

Workers run as subprocesses (tests/integration/ingest_worker.py, the way production runs them);
the test waits on their ``/status/`` and ``/dump/`` pages with deadlines.  One test walks the
whole life cycle to share worker start-ups (each costs seconds):

(a) counts in the table equal the produced input exactly, changelog records sit in the partition
    of their user's plays, and the group's committed offsets reach the end of the topic;
(b) after SIGTERM, a new worker (same app id, fresh state dir) rebuilds the table exactly from
    the changelog and re-processes nothing;
(c) a second worker joins: the two split the 8 partitions; new input is counted exactly across
    both; after SIGKILL of one, the survivor owns all 8 partitions and holds every user exactly
    (uncommitted records are re-delivered and de-duplicated by the per-user source offset).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from benchmarks.stream_ingest import get_json, produce_plays, start_worker, status, stop_worker
from tests.integration.workers import wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 8


def _events(
    n: int, users: int, tracks: int, seed: int, expected: dict[str, dict[str, int]]
) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user, track = f"user-{rng.randrange(users)}", f"track-{rng.randrange(tracks)}"
        row = expected.setdefault(user, {})
        row[track] = row.get(track, 0) + 1
        value = msgpack.packb({"user": user, "track": track, "ts": 1_700_000_000_000 + i, "ms_played": 1000 + i})
        out.append((user.encode(), value))
    return out


def dump(port: int) -> dict[str, dict[str, int]] | None:
    try:
        return get_json(f"http://127.0.0.1:{port}/dump/", timeout=5.0)
    except (OSError, ValueError):
        return None


def committed_total(bootstrap: str, group: str, topic: str) -> int:
    """Sum of the group's committed offsets on ``topic`` (fetched without joining the group)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(PARTITIONS))
    finally:
        consumer.close()


def changelog_partitions(bootstrap: str, topic: str) -> dict[bytes, set[int]]:
    """key -> set of partitions it appears in, reading ``topic`` from start to its end offsets."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        seen: dict[bytes, set[int]] = {}
        remaining = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + 30
        while remaining and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    seen.setdefault(r.key, set()).add(r.partition)
                if consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        assert not remaining, f"could not read changelog partitions {remaining}"
        return seen
    finally:
        consumer.close()


def _diagnose(proc: Any, port: int, log: Path, dump_deadline_s: float = 10.0) -> str:
    """What a stuck worker is doing: its /status/, then its log after a SIGUSR1 state dump
    (stream/diagnostics.py: every task's stack and the consumer's fetch state)."""
    last = status(port)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGUSR1)
        end = time.monotonic() + dump_deadline_s
        while time.monotonic() < end and "state dump on signal" not in log.read_text(errors="replace"):
            time.sleep(0.2)
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return f"worker on port {port} (exit {proc.poll()}): status {last}\nlog tail:\n{text[-60_000:]}"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Any]]:
    procs: list[Any] = []
    yield procs
    for proc in procs:
        stop_worker(proc, timeout=15, sig=signal.SIGKILL)


def test_ingest_counts_recovery_and_rebalance(
    kafka_bootstrap: str, unique_topic: str, tmp_path: Path, workers: list[Any]
) -> None:
    expected: dict[str, dict[str, int]] = {}
    first = _events(20_000, users=400, tracks=60, seed=1, expected=expected)
    prod = produce_plays(kafka_bootstrap, unique_topic, first, partitions=PARTITIONS)
    partition_of = dict(prod["partition_of"])
    app_id = f"ingest-{unique_topic[-10:]}"
    group_total = len(first)

    procs: dict[int, Any] = {}  # web port -> worker process
    logs: dict[int, Path] = {}  # web port -> worker log

    def wait_worker(port: int, condition: Any, deadline_s: float, what: str) -> Any:
        """`wait_for`, failing with the worker's last status, its task stacks (SIGUSR1 dump) and log."""
        try:
            return wait_for(condition, deadline_s, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_diagnose(procs[port], port, logs[port])}") from None

    def launch(name: str) -> int:
        proc, port = start_worker(
            kafka_bootstrap,
            unique_topic,
            app_id,
            "ingest",
            tmp_path / name,
            partitions=PARTITIONS,
            max_batch=2000,
            max_latency_s=0.05,
            log_path=tmp_path / f"{name}.log",
            loglevel="info",
            extra_env={"INGEST_SESSION_TIMEOUT": "8"},  # SIGKILLed member leaves the group quickly
        )
        workers.append(proc)
        procs[port] = proc
        logs[port] = tmp_path / f"{name}.log"
        return port

    # (a) one worker counts everything exactly ------------------------------------------------
    p1 = launch("w1")
    all_parts = list(range(PARTITIONS))
    wait_worker(p1, lambda: (s := status(p1)) and s["assigned"] == all_parts, 60, "w1 to own all partitions")
    wait_worker(p1, lambda: dump(p1) == expected, 60, "w1 table == input")
    wait_for(
        lambda: committed_total(kafka_bootstrap, app_id, unique_topic) == group_total,
        30,
        "committed offsets == produced",
    )
    changelog = changelog_partitions(kafka_bootstrap, f"{app_id}-counts-changelog")
    changelog = {json.loads(k).encode(): parts for k, parts in changelog.items()}  # table keys are JSON
    assert set(changelog) == {u.encode() for u in expected}
    misplaced = {k: (parts, partition_of[k]) for k, parts in changelog.items() if parts != {partition_of[k]}}
    assert not misplaced, f"changelog records not co-partitioned with plays: {list(misplaced.items())[:5]}"

    # the on-demand state dump (stream.diagnostics) survives mode installing its own SIGUSR1 handler
    os.kill(procs[p1].pid, signal.SIGUSR1)
    wait_for(lambda: "== consumer: flow_active" in logs[p1].read_text(errors="replace"), 30, "w1's state dump")

    # (b) SIGTERM, then a fresh worker rebuilds the table from the changelog --------------------
    assert stop_worker(procs[p1], timeout=30) == 0
    p2 = launch("w2")
    wait_worker(p2, lambda: (s := status(p2)) and s["recovered"] and s["assigned"] == all_parts, 60, "w2 recovered")
    wait_worker(p2, lambda: dump(p2) == expected, 30, "w2 table == input")
    assert status(p2)["events"] == 0, "a recovered worker must not re-process committed records"

    # (c) a second worker joins, more input arrives, then the second one is killed --------------
    p3 = launch("w3")

    def split() -> bool:
        s2, s3 = status(p2), status(p3)
        if not (s2 and s3) or s2["rebalancing"] or s3["rebalancing"]:
            return False
        a2, a3 = set(s2["assigned"]), set(s3["assigned"])
        return bool(a2 and a3 and not a2 & a3 and a2 | a3 == set(range(PARTITIONS)) and s3["recovered"])

    wait_worker(p3, split, 60, "w2 and w3 to split the partitions")
    more = _events(6_000, users=500, tracks=60, seed=2, expected=expected)
    partition_of.update(
        produce_plays(kafka_bootstrap, unique_topic, more, partitions=PARTITIONS, create=False)["partition_of"]
    )

    def union_matches() -> bool:
        d2, d3 = dump(p2), dump(p3)
        return d2 is not None and d3 is not None and not set(d2) & set(d3) and {**d2, **d3} == expected

    wait_worker(p3, union_matches, 60, "w2 + w3 tables == all input")
    owned3 = set(status(p3)["assigned"])
    assert all(partition_of[u.encode()] in owned3 for u in dump(p3)), "w3 holds a user of a partition it does not own"

    stop_worker(procs[p3], sig=signal.SIGKILL)
    wait_worker(
        p2,
        lambda: (
            (s := status(p2)) and s["assigned"] == list(range(PARTITIONS)) and s["recovered"] and not s["rebalancing"]
        ),
        60,
        "w2 to take over all partitions",
    )
    wait_worker(p2, lambda: dump(p2) == expected, 30, "w2 table == all input")
