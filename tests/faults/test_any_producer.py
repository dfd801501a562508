"""Plays from any producer are counted exactly: librdkafka's default partitioner (CRC32) and a
round-robin one put most plays on another partition than their user's; the workers forward those to
the user's partition (`plays.repartition`) and count them there, while one of two workers is killed.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from stream.partitioning import KeyPartitioner

from ..integration.workers import WorkerProcess, wait_for
from .harness import (
    PARTITIONS,
    ConfluentReplay,
    Replay,
    counts_over_http,
    difference,
    play_log,
    publish_model,
    unique_names,
    wait_for_durable_counts,
    wait_for_exact_counts,
)
from .test_exactly_once import both_ready

pytestmark = pytest.mark.integration

N_EACH = 20_000
RATE = 800  # events/s per producer: ~25 s, long enough for a kill and a take-over in the middle


def records_in(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        return sum(end[tp] - begin[tp] for tp in tps)
    finally:
        consumer.close()


def merged(*expected: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for counts in expected:
        for user, tracks in counts.items():
            mine = out.setdefault(user, {})
            for track, n in tracks.items():
                mine[track] = mine.get(track, 0) + n
    return out


def test_plays_from_confluent_kafka_and_round_robin_are_counted_exactly(kafka_bootstrap, tmp_path):
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    plays = prefix + "plays"
    confluent_log, round_robin_log = play_log(N_EACH, seed=11), play_log(N_EACH, seed=12)
    expected = merged(confluent_log.expected, round_robin_log.expected)
    murmur2 = KeyPartitioner(PARTITIONS)
    misplaced_rr = sum(murmur2(key) != i % PARTITIONS for i, (key, _) in enumerate(round_robin_log.records))

    def start(name: str) -> WorkerProcess:  # the default table store, its own data dir across restarts
        return WorkerProcess(
            kafka_bootstrap,
            store.root,
            prefix,
            app_id,
            tmp_path / name,
            table_store=None,
            data_dir=tmp_path / f"data-{name[0]}",
            session_timeout=6,
        )

    workers = {"a": start("a"), "b": start("b")}
    try:
        wait_for(lambda: both_ready(workers["a"], workers["b"]), 120, "two workers splitting the partitions")
        replays = [
            ConfluentReplay(kafka_bootstrap, plays, confluent_log.records, RATE).start(),
            Replay(
                kafka_bootstrap, plays, round_robin_log.records, RATE, partition_of=lambda i: i % PARTITIONS
            ).start(),
        ]
        replays[0].wait_sent(N_EACH * 2 // 5, 120)
        killed_at, killed_after = time.monotonic(), replays[0].sent + replays[1].sent
        workers["b"].kill()
        workers["b"] = start("b2")
        wait_for(lambda: both_ready(workers["a"], workers["b"]), 180, "both workers ready after the kill")
        recovery_s = time.monotonic() - killed_at
        for replay in replays:
            replay.wait(180)
        settle_s = wait_for_exact_counts(lambda: workers["a"], expected, 180)
        assert difference(expected, counts_over_http(workers["b"], sorted(expected))) == (0, 0)
        durable_s = wait_for_durable_counts(kafka_bootstrap, app_id, expected, 60)
        dead = records_in(kafka_bootstrap, prefix + "plays.dead-letter")
        forwarded = records_in(kafka_bootstrap, prefix + "plays.repartition")
        assert dead == 0, f"{dead} plays dead-lettered"
        # most plays really were on the wrong partition (re-sends after the kill may add a few forwards)
        assert forwarded >= misplaced_rr + N_EACH // 2, (forwarded, misplaced_rr)
        print(
            f"\nany producer: {N_EACH} plays via confluent-kafka (default partitioner) + {N_EACH} round-robin "
            f"(kafka-python), {len(expected)} users; {forwarded} forwarded to their user's partition "
            f"({misplaced_rr} of the round-robin ones misplaced); worker b killed after {killed_after} plays, "
            f"both ready {recovery_s:.1f} s later; counts exact "
            f"{settle_s:.1f} s after the replays (changelog {durable_s:.1f} s later); lost 0, duplicated 0, "
            "dead letters 0"
        )
    finally:
        for worker in workers.values():
            worker.stop()
