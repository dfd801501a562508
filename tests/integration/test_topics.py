"""`ensure_topics` on the real broker: every topic a worker uses, changelogs included, exists with the
worker's partition count before the worker starts; a `plays` topic with another count is refused;
compacted topics roll their segments so the log cleaner can compact them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from batch.user_state import changelog_topic
from stream.settings import SettingsError, Topics, WorkerSettings
from stream.topics import COMPACTED_SEGMENT_MS, LISTENERS_TABLE, ensure_topics

pytestmark = pytest.mark.integration


def settings(bootstrap: str, prefix: str, partitions: int = 4) -> WorkerSettings:
    return WorkerSettings(
        bootstrap=bootstrap,
        store=Path("unused"),
        app_id=f"{prefix}app",
        partitions=partitions,
        topics=Topics(prefix=prefix),
    )


def test_creates_every_topic_with_leaders_and_compacted_changelogs(kafka_bootstrap: str) -> None:
    prefix = f"tp-{uuid.uuid4().hex[:8]}-"
    s = settings(kafka_bootstrap, prefix)
    ensure_topics(s)
    ensure_topics(s)  # idempotent
    changelogs = [changelog_topic(s.app_id), changelog_topic(s.app_id, LISTENERS_TABLE)]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        described = {t["name"]: t for t in admin.describe_topics([s.topics.plays, *changelogs])}
        for name in (s.topics.plays, *changelogs):
            partitions = described[name]["partitions"]
            assert len(partitions) == 4 and all(p["leader_id"] >= 0 for p in partitions), name
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in changelogs])
        for name in changelogs:
            assert configs["topic"][name]["cleanup.policy"]["value"] == "compact", name
            assert configs["topic"][name]["segment.ms"]["value"] == str(COMPACTED_SEGMENT_MS), name
    finally:
        admin.close()


def _segment_ms(admin: KafkaAdminClient, names: list[str]) -> dict[str, str]:
    resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    described = admin.describe_configs(resources, config_filter="all")
    return {n: described["topic"][n]["segment.ms"]["value"] for n in names}


def test_rolls_segments_of_compacted_topics_created_without_it_and_keeps_an_operators_value(
    kafka_bootstrap: str,
) -> None:
    """A deployment upgraded from a release that created its changelogs with the broker's 7-day segments
    gets the roll at the next worker start; a `segment.ms` an operator set on a topic is kept, and no
    other setting of the topic changes."""
    prefix = f"tp-{uuid.uuid4().hex[:8]}-"
    s = settings(kafka_bootstrap, prefix)
    users, listeners = changelog_topic(s.app_id), changelog_topic(s.app_id, LISTENERS_TABLE)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        old = {"cleanup.policy": "compact", "retention.ms": "123456789"}
        admin.create_topics(
            [
                NewTopic(users, 4, 1, topic_configs=old),
                NewTopic(listeners, 4, 1, topic_configs={**old, "segment.ms": "3600000"}),
            ]
        )
        ensure_topics(s)
        assert _segment_ms(admin, [users, listeners]) == {users: str(COMPACTED_SEGMENT_MS), listeners: "3600000"}
        kept = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, users)])["topic"][users]
        assert kept["retention.ms"]["value"] == "123456789" and kept["cleanup.policy"]["value"] == "compact"
        ensure_topics(s)  # idempotent
        assert _segment_ms(admin, [users, listeners]) == {users: str(COMPACTED_SEGMENT_MS), listeners: "3600000"}
    finally:
        admin.close()


def test_refuses_a_plays_topic_with_another_partition_count(kafka_bootstrap: str) -> None:
    prefix = f"tp-{uuid.uuid4().hex[:8]}-"
    s = settings(kafka_bootstrap, prefix)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(s.topics.plays, 2, 1)])
    finally:
        admin.close()
    with pytest.raises(SettingsError, match="--partitions 2"):
        ensure_topics(s)
