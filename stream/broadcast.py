"""Topics every worker reads in full (no consumer group): model announcements and new-track vectors.

A `BroadcastReader` assigns itself all partitions of a topic, starts from the beginning (replaying a
compacted topic such as `track-vectors`) or the end (`model-updates`), and hands each batch of
records to a callback. It runs as a task inside the faust worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

log = logging.getLogger(__name__)

Callback = Callable[[list[Any]], Awaitable[None]]


class BroadcastReader:
    """Read every partition of `topic` and pass record batches to `callback` until stopped."""

    def __init__(
        self, bootstrap: str, topic: str, callback: Callback, from_beginning: bool, client_kwargs: dict | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.callback = callback
        self.from_beginning = from_beginning
        self.client_kwargs = client_kwargs or {}
        self.caught_up = asyncio.Event()
        self._stopping = False

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, **self.client_kwargs
        )
        await consumer.start()
        try:
            partitions = None
            while not partitions and not self._stopping:
                partitions = consumer.partitions_for_topic(self.topic)
                if not partitions:
                    await consumer._client.force_metadata_update()  # the topic may be created just now
                    partitions = consumer.partitions_for_topic(self.topic)
                    if not partitions:
                        await asyncio.sleep(0.5)  # poll interval while the topic does not exist yet
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            if self.from_beginning:
                await consumer.seek_to_beginning(*tps)
            else:
                await consumer.seek_to_end(*tps)
            end = await consumer.end_offsets(tps)
            if await _reached(consumer, end):
                self.caught_up.set()
            while not self._stopping:
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batches.values():
                    try:
                        await self.callback(records)
                    except Exception:  # one bad record must not stop the reader
                        log.exception("%s: callback failed on %d records", self.topic, len(records))
                if not self.caught_up.is_set() and await _reached(consumer, end):
                    self.caught_up.set()
        finally:
            await consumer.stop()

    def stop(self) -> None:
        self._stopping = True


async def _reached(consumer: AIOKafkaConsumer, end: dict) -> bool:
    """True when the consumer's position is at or past `end` on every partition."""
    for tp, offset in end.items():
        if await consumer.position(tp) < offset:
            return False
    return True


async def read_to_end(bootstrap: str, topic: str, client_kwargs: dict | None = None, timeout_s: float = 10.0) -> list:
    """Every record of `topic` now (all partitions, from the beginning to the end offsets): a small
    compacted topic read once, e.g. inside a recovery, where no reader task may be running yet."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **(client_kwargs or {})
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await _reached(consumer, end):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout_s:.0f} s")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()
