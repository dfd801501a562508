"""Bulk table writes: update a faust table's local store and send its changelog records in batches.

faust's `table[key] = value` sends every changelog record through its per-message producer buffer
(~30 us of Python each); a micro-batch that changes thousands of users spends most of its time
there. `BulkTableWriter.write` does the same two things for many keys at once: it sets the values
in the table's store (inside an event context naming the partition, which the RocksDB store needs)
and appends the changelog records to one aiokafka batch per partition, awaiting delivery before it
returns, so the caller acks its input only after the changelog is durable. It also records the
persisted changelog offset, as faust does, so a RocksDB store recovers from where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from faust.streams import _current_event
from faust.types import TP, Message

log = logging.getLogger(__name__)


#: A changelog send or delivery still waiting after this many seconds is logged (and again each period).
SLOW_WRITE_S = 10.0


async def _logged(awaitable: Any, topic: str, partition: int) -> Any:
    """Await a producer step, logging a warning every SLOW_WRITE_S while it waits: one stop was seen
    with a changelog batch waiting in aiokafka's accumulator for a drain that never came."""
    task = asyncio.ensure_future(awaitable)
    waited = 0.0
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(task), SLOW_WRITE_S)
        except asyncio.TimeoutError:
            waited += SLOW_WRITE_S
            log.warning("changelog write to %s[%d] still waiting after %.0f s", topic, partition, waited)


class BulkTableWriter:
    """Write many (key, value, partition) entries of one raw-bytes table at once."""

    def __init__(self, app: Any, table: Any, source_topic: str) -> None:
        self.app = app
        self.table = table
        self.source_topic = source_topic

    @contextlib.contextmanager
    def _partition_context(self, partition: int) -> Iterator[None]:
        message = Message(self.source_topic, partition, -1, time.time(), 0, [], None, None, None)
        event = self.app.create_event(None, None, [], message)
        token = _current_event.set(weakref.ref(event))
        try:
            yield
        finally:
            _current_event.reset(token)

    async def write(self, entries: list[tuple[bytes, bytes, int]]) -> None:
        """Set `key -> value` for every entry and make the changelog durable (partition per entry)."""
        if not entries:
            return
        by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for key, value, partition in entries:
            by_partition[partition].append((key, value))
        store = self.table.data
        for partition, pairs in by_partition.items():
            with self._partition_context(partition):
                for key, value in pairs:
                    store[key] = value
        producer = self.app.producer._ensure_producer()
        topic = self.table.changelog_topic.get_topic_name()
        pending: list[tuple[asyncio.Future, int, int]] = []
        for partition, pairs in by_partition.items():
            batch, count = producer.create_batch(), 0
            for key, value in pairs:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full: ship it
                    batch.close()
                    sent = await _logged(producer.send_batch(batch, topic, partition=partition), topic, partition)
                    pending.append((sent, partition, count))
                    batch, count = producer.create_batch(), 0
                    batch.append(key=key, value=value, timestamp=None)
                count += 1
            batch.close()
            sent = await _logged(producer.send_batch(batch, topic, partition=partition), topic, partition)
            pending.append((sent, partition, count))
        last: dict[int, int] = {}
        for future, partition, count in pending:
            metadata = await _logged(future, topic, partition)
            last[partition] = max(last.get(partition, -1), metadata.offset + count - 1)
        for partition, offset in last.items():
            store.set_persisted_offset(TP(topic, partition), offset)
