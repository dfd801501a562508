"""Announce a published model version on the `model-updates` topic (workers hot-swap to it)."""

from __future__ import annotations

import logging
from pathlib import Path

from stream.codec import MODEL_UPDATES_TOPIC, model_update
from stream.settings import KafkaSecurity

log = logging.getLogger(__name__)


def announce_model(bootstrap: str, version: str, store: str | Path, topic_prefix: str = "") -> None:
    """Produce `{"version", "store"}` to `<prefix>model-updates` and wait until the broker has it."""
    from kafka import KafkaProducer

    kwargs = KafkaSecurity.from_env().kafka_python_kwargs()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **kwargs)
    try:
        producer.send(topic_prefix + MODEL_UPDATES_TOPIC, value=model_update(version, str(store))).get(timeout=30)
    finally:
        producer.close()
    log.info("announced model %s on %s%s", version, topic_prefix, MODEL_UPDATES_TOPIC)
