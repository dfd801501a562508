"""10K hostile payloads interleaved with valid plays on the real broker: the worker keeps running,
its memory stays bounded, every hostile record lands in the dead-letter topic with its original
bytes and a reason, and every valid play is counted."""

from __future__ import annotations

import random
import time
from collections import Counter

import msgpack
import pytest
from kafka import KafkaProducer

from stream.events import encode_play
from stream.partitioning import KeyPartitioner

from ..integration.workers import WorkerProcess, read_topic, wait_for
from .harness import counts_over_http, difference, publish_model, unique_names, wait_for_exact_counts
from .hostile import KINDS, exotic_valid, hostile_internal, hostile_records

pytestmark = pytest.mark.integration

N_HOSTILE = 10_000
N_VALID = 2_000
#: Growth of the worker's peak resident memory allowed over the flood (aiokafka buffers, metrics).
MAX_RSS_GROWTH_MB = 64


def rss_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_hostile_payloads_are_dead_lettered_and_valid_plays_counted(kafka_bootstrap, tmp_path):
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    worker = WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / "w")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        worker.wait_ready(120)
        rss_before = rss_kb(worker.proc.pid, "VmRSS")
        hostile = hostile_records(N_HOSTILE, seed=11)
        rng = random.Random(5)
        now = int(time.time() * 1000)
        expected: dict[str, dict[str, int]] = {}
        valid = exotic_valid(N_VALID // 2)
        valid += [(f"v{rng.randrange(200)}", f"t{rng.randrange(100)}") for _ in range(N_VALID - len(valid))]
        for user, track in valid:
            per_user = expected.setdefault(user, {})
            per_user[track] = per_user.get(track, 0) + 1
        stream = [("bad", r) for r in hostile] + [("good", v) for v in valid]
        rng.shuffle(stream)
        for kind, item in stream:
            if kind == "good":
                key, value = encode_play(*item, now, 60_000)
            else:
                key, value, _ = item
            producer.send(prefix + "plays", key=key, value=value)
        producer.flush()

        records = read_topic(kafka_bootstrap, prefix + "plays.dead-letter", N_HOSTILE, 180)
        assert len(records) == N_HOSTILE
        assert Counter((r.key, r.value) for r in records) == Counter((k, v) for k, v, _ in hostile)
        reasons = [dict(r.headers).get("reason", b"").decode() for r in records]
        assert all(reasons), "every dead letter carries a reason"
        wait_for_exact_counts(lambda: worker, expected, 120)  # a 503 (rebalancing) counts as "not yet"
        assert difference(expected, counts_over_http(worker, sorted(expected))) == (0, 0)
        assert worker.proc.poll() is None
        growth_mb = (rss_kb(worker.proc.pid, "VmHWM") - rss_before) / 1024
        assert growth_mb < MAX_RSS_GROWTH_MB, f"peak RSS grew by {growth_mb:.0f} MB"
        dead_metric = worker.metric("playrec_dead_letters_total")
        assert dead_metric == N_HOSTILE
        print(
            f"\nhostile: {N_HOSTILE} payloads of {len(KINDS)} kinds + {N_VALID} valid plays: "
            f"{len(records)} dead letters with reasons, valid counted exactly, worker alive, "
            f"peak RSS {rss_before / 1024:.0f} MB -> +{growth_mb:.1f} MB; "
            f"reasons e.g. {sorted(set(r.split(':')[0][:50] for r in reasons))[:8]}"
        )
    finally:
        producer.close()
        worker.stop()


N_INTERNAL = 2_000


def test_hostile_records_on_internal_topics_are_dead_lettered(kafka_bootstrap, tmp_path):
    """track-plays, track-vectors, track-takedowns and plays.repartition are written by workers, but anyone
    with access can write there too: every bad record is dead-lettered once with a reason, the worker
    keeps running, and valid plays and take-downs after the flood are still applied."""
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    worker = WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / "w")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        worker.wait_ready(120)
        hostile = hostile_internal(N_INTERNAL, seed=3)
        murmur2 = KeyPartitioner(8)
        for i, (topic, key, value, kind) in enumerate(hostile):
            headers = [("playrec-source", b"x:-1")] if kind == "bad-header" else None
            partition = {"track-takedowns": 0, "plays.repartition": murmur2(key)}.get(topic, i % 8)
            producer.send(prefix + topic, key=key, value=value, partition=partition, headers=headers)
        producer.flush()
        records = read_topic(kafka_bootstrap, prefix + "plays.dead-letter", N_INTERNAL, 180)
        assert Counter((r.key, r.value) for r in records) == Counter((k, v) for _, k, v, _ in hostile)
        by_topic = Counter(dict(r.headers)["source"].decode().rsplit("/", 2)[0][len(prefix) :] for r in records)
        assert by_topic == Counter(topic for topic, *_ in hostile), by_topic
        assert all(dict(r.headers).get("reason") for r in records)
        assert worker.proc.poll() is None
        # still working: a valid take-down and valid plays after the flood
        key, value = encode_play("after", "t3", int(time.time() * 1000), 60_000)
        producer.send(prefix + "plays", key=key, value=value)
        producer.send(
            prefix + "track-takedowns",
            key=b"t3",
            value=msgpack.packb({"track": "t3", "taken_down": True, "reason": "", "at": 0}),
        )
        producer.flush()
        wait_for_exact_counts(lambda: worker, {"after": {"t3": 1}}, 60)
        wait_for(lambda: worker.request("/tracks/t3/similar?k=3")[0] == 404, 60, "the take-down to apply")
        reasons = sorted({dict(r.headers)["reason"].decode().split(":")[0][:40] for r in records})
        print(f"\nhostile internal: {N_INTERNAL} records on 4 internal topics, each dead-lettered once: {reasons[:6]}")
    finally:
        producer.close()
        worker.stop()
