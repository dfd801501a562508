"""Create the stream's topics up front with the partition counts the worker relies on, the tables'
changelogs included (faust would otherwise create those itself as each worker starts: several workers
starting at once raced to create them, and one worker's first changelog write then waited without end
in a CI run)."""

from __future__ import annotations

import logging
import time

from batch.user_state import changelog_topic
from stream.settings import SettingsError, WorkerSettings

log = logging.getLogger(__name__)

#: The stream worker's table other than `user-state` (its changelog: `changelog_topic(app_id, LISTENERS_TABLE)`).
LISTENERS_TABLE = "track-listeners"
#: Seconds to wait for every partition of the topics just created to have a leader.
LEADERS_DEADLINE_S = 30.0
#: Milliseconds after which a compacted topic's active segment is closed (at its next write), so the log
#: cleaner can compact it. Kafka compacts closed segments only; with the broker's default (7 days, 1 GiB)
#: a changelog keeps every row ever written and a worker that restores it (a take-over, a restart with an
#: empty store) reads all of them: restore time grew with uptime (docs/RELIABILITY.md, "Take-over
#: recovery"). With one-minute segments a restore reads the latest row per key plus at most about a minute
#: of rows and the dirty share the cleaner leaves (`min.cleanable.dirty.ratio`, 0.5 by default).
COMPACTED_SEGMENT_MS = 60_000
#: The configuration of every compacted topic the workers create (changelogs, track vectors, take-downs,
#: repairs).
COMPACTED = {"cleanup.policy": "compact", "segment.ms": str(COMPACTED_SEGMENT_MS)}


def ensure_topics(settings: WorkerSettings, replication: int = 1) -> None:
    """Create missing topics; refuse to run when `plays` has a different partition count.

    The tables are partitioned like `plays`; a mismatch would put a user's counts on another
    partition than their plays.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    P = settings.partitions
    names = settings.topics
    plays = names.plays
    wanted = {
        plays: (P, {}),
        names.dead_letter: (P, {}),
        names.repartition: (P, {}),
        names.track_plays: (P, {}),
        names.track_vectors: (P, COMPACTED),
        names.track_takedowns: (1, COMPACTED),
        names.model_updates: (1, {}),
        names.repairs: (1, COMPACTED),
        changelog_topic(settings.app_id): (P, COMPACTED),
        changelog_topic(settings.app_id, LISTENERS_TABLE): (P, COMPACTED),
    }
    kwargs = settings.security.kafka_python_kwargs()
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="playrec-topics", **kwargs)
    try:
        existing = admin.describe_topics(list(wanted))
        have = {
            t.get("name", t.get("topic")): len(t["partitions"])
            for t in existing
            if not t.get("error_code") and t["partitions"]
        }
        if plays in have and have[plays] != P:
            raise SettingsError(
                f"topic {plays!r} has {have[plays]} partitions but the worker is configured for {P}: "
                f"run with --partitions {have[plays]}"
            )
        for name in (names.repartition, names.track_plays):  # co-partitioned with plays and the tables
            if name in have and have[name] != P:
                raise SettingsError(
                    f"topic {name!r} has {have[name]} partitions but {plays!r} needs {P}: delete {name!r} "
                    "(the workers recreate it) or give it the same partition count"
                )
        missing = [
            NewTopic(name, n, replication, topic_configs=cfg) for name, (n, cfg) in wanted.items() if name not in have
        ]
        for topic in missing:
            try:
                admin.create_topics([topic])
                log.info("created topic %s (%d partitions)", topic.name, topic.num_partitions)
            except TopicAlreadyExistsError:
                pass
        if missing:
            _wait_for_leaders(admin, [t.name for t in missing])
        compacted = [name for name, (_, cfg) in wanted.items() if cfg is COMPACTED and name in have]
        _roll_compacted_segments(admin, compacted)
    finally:
        admin.close()


def _roll_compacted_segments(admin, topics: list[str]) -> None:
    """Give compacted topics created before `COMPACTED_SEGMENT_MS` existed (or by hand) the segment roll,
    unless their `segment.ms` was set on the topic on purpose (an operator's choice is kept). Incremental:
    no other setting of the topic changes."""
    from kafka.admin import ConfigResource, ConfigResourceType

    if not topics:
        return
    described = admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics], config_filter="all"
    )
    for name in topics:
        entry = described.get("topic", {}).get(name, {}).get("segment.ms", {})
        if entry.get("config_source") == "DYNAMIC_TOPIC_CONFIG":
            continue  # set on the topic: kept
        wanted = str(COMPACTED_SEGMENT_MS)
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, {"segment.ms": wanted})])
        log.info(
            "topic %s: segment.ms %s -> %s so the log cleaner compacts it (restores read the latest rows only)",
            name,
            entry.get("value"),
            wanted,
        )


def _wait_for_leaders(admin, topics: list[str]) -> None:
    """Wait until every partition of `topics` has a leader (a new topic's partitions get theirs shortly
    after it is created); logs and goes on at the deadline (the clients retry on their own)."""
    deadline = time.monotonic() + LEADERS_DEADLINE_S
    while True:
        described = admin.describe_topics(topics)
        waiting = [
            t.get("name", t.get("topic"))
            for t in described
            if t.get("error_code")
            or not t["partitions"]
            or any(p.get("leader_id", p.get("leader", -1)) < 0 for p in t["partitions"])
        ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            log.warning("topics without a leader on every partition after %.0f s: %s", LEADERS_DEADLINE_S, waiting)
            return
        time.sleep(0.1)
