"""Create the stream's topics up front with the partition counts the worker relies on."""

from __future__ import annotations

import logging

from stream.settings import SettingsError, WorkerSettings

log = logging.getLogger(__name__)


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
        names.track_plays: (P, {}),
        names.track_vectors: (P, {"cleanup.policy": "compact"}),
        names.track_takedowns: (1, {"cleanup.policy": "compact"}),
        names.model_updates: (1, {}),
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
        missing = [
            NewTopic(name, n, replication, topic_configs=cfg) for name, (n, cfg) in wanted.items() if name not in have
        ]
        for topic in missing:
            try:
                admin.create_topics([topic])
                log.info("created topic %s (%d partitions)", topic.name, topic.num_partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
