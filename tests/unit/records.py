"""A stand-in for the aiokafka ConsumerRecord the ingest hands to a worker's batch handlers."""

from __future__ import annotations

from typing import NamedTuple


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple = ()
    timestamp: int = 1_700_000_000_000
