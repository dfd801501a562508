"""Snapshot the stream's play counts from Kafka: the input of `playrec train --from-kafka`.

Reads the changelog topic of the workers' `user-state` table from the beginning to the end offsets
taken when the snapshot starts (the model's input watermark), keeps the latest row per user and
turns the counts into `PlayCounts`. A record that is not a user-state row is reported with its
topic/partition/offset; the snapshot fails unless told to skip such records, and then lists them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from batch.plays import CountsBuilder, PlayCounts
from batch.user_state import UserStateError, changelog_topic, unpack_user

log = logging.getLogger(__name__)

#: Damaged records named in an error message or manifest (the count is always complete).
MAX_REPORTED = 20


class SnapshotError(RuntimeError):
    """The snapshot cannot be taken (no such topic, broker unreachable, damaged records)."""


class EmptySnapshotError(SnapshotError):
    """The changelog holds no streams yet (nothing to train on)."""


@dataclass
class Snapshot:
    """Counts read from the stream; `watermark` maps partition -> end offset read up to (exclusive)."""

    counts: PlayCounts
    topic: str
    watermark: dict[int, int]
    records: int
    bad_records: list[str] = field(default_factory=list)
    bad_count: int = 0

    def source(self) -> dict[str, Any]:
        """The manifest's `input` description (the watermark of the model)."""
        return {
            "source": "stream",
            "topic": self.topic,
            "offsets": {str(p): o for p, o in sorted(self.watermark.items())},
            "records": self.records,
            "skipped_records": self.bad_count,
            "skipped_examples": self.bad_records,
        }


def snapshot_counts(
    bootstrap: str,
    app_id: str = "playrec",
    skip_bad_records: bool = False,
    timeout_s: float = 300.0,
    client_kwargs: dict | None = None,
) -> Snapshot:
    """Read every user's latest counts from `<app_id>-user-state-changelog` up to its current end."""
    from kafka import KafkaConsumer, TopicPartition

    topic = changelog_topic(app_id)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **(client_kwargs or {})
    )
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise SnapshotError(
                f"topic {topic!r} does not exist on {bootstrap}: is --app-id the workers' app id "
                f"(default playrec), and have they processed any plays?"
            )
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = {tp: offset for tp, offset in consumer.end_offsets(tps).items()}
        rows: dict[bytes, bytes | None] = {}
        bad: list[str] = []
        bad_count = records = 0
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise SnapshotError(f"snapshot of {topic} did not reach the end offsets within {timeout_s:.0f} s")
            for tp, batch in consumer.poll(timeout_ms=500, max_records=50_000).items():
                for record in batch:
                    if record.offset >= end[tp]:
                        continue  # written after the watermark: the next model's
                    records += 1
                    if record.key is None:
                        bad_count += 1
                        if len(bad) < MAX_REPORTED:
                            bad.append(f"{topic}/{tp.partition}/{record.offset}: record without a key")
                        continue
                    rows[record.key] = record.value
    finally:
        consumer.close()
    states = {}
    for key, raw in rows.items():
        if raw is None:
            continue  # a deleted row
        try:
            user = key.decode("utf-8")
            states[user] = unpack_user(raw)
        except (UnicodeDecodeError, UserStateError) as exc:
            bad_count += 1
            if len(bad) < MAX_REPORTED:
                bad.append(f"{topic} key {key[:60]!r}: {exc}")
    if bad_count and not skip_bad_records:
        raise SnapshotError(
            f"{bad_count} records of {topic} are not user-state rows (e.g. {'; '.join(bad[:3])}); "
            f"pass --skip-bad-records to train without them (they are listed in the manifest)"
        )
    if bad_count:
        log.warning("skipped %d damaged records of %s: %s", bad_count, topic, "; ".join(bad[:3]))
    counts = _counts(states)
    log.info(
        "snapshot of %s: %d records, %d users, %d (user, track) counts", topic, records, *counts.shape[:1], counts.nnz
    )
    return Snapshot(counts, topic, {tp.partition: o for tp, o in end.items()}, records, bad, bad_count)


def _counts(states: dict) -> PlayCounts:
    builder = CountsBuilder()
    for user, state in states.items():
        builder.add_user(user)
        for track, count in state.counts.items():
            builder.add(user, track, float(count))
    if not builder.rows:
        raise EmptySnapshotError("the stream holds no streams yet: nothing to train on")
    return builder.build()
