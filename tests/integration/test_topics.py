"""`ensure_topics` on the real broker: every topic a worker uses, changelogs included, exists with the
worker's partition count before the worker starts; a `plays` topic with another count is refused."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from batch.user_state import changelog_topic
from stream.settings import SettingsError, Topics, WorkerSettings
from stream.topics import LISTENERS_TABLE, ensure_topics

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
