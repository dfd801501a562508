"""Shared pytest fixtures: a Kafka broker for integration tests.

``kafka_bootstrap`` uses ``KAFKA_BOOTSTRAP`` when it is set (an existing broker), else starts one
:class:`playrec.devbroker.DevBroker` for the whole session, lazily, only if a test asks for it.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository root is importable even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from playrec.devbroker import BrokerError, DevBroker, resolve_bootstrap  # noqa: E402


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``"host:port"`` of a Kafka broker: ``$KAFKA_BOOTSTRAP``, or a development broker for the session.

    The session broker's data and logs stay in pytest's temporary directory (``.../kafka0/logs``)
    for post-mortems.
    """
    existing = resolve_bootstrap()
    if existing:
        yield existing
        return
    broker = DevBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    try:
        bootstrap = broker.start()
    except BrokerError as exc:
        pytest.fail(f"could not start the development Kafka broker: {exc}", pytrace=False)
    try:
        yield bootstrap
    finally:
        broker.stop()


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test (or earlier run against the same broker) uses."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")[:80] or "topic"
    return f"test-{stem}-{uuid.uuid4().hex[:10]}"
