"""Bulk table writes: update a faust table's local store and send its changelog records in batches.

faust's `table[key] = value` sends every changelog record through its per-message producer buffer
(~30 us of Python each); a micro-batch that changes thousands of users spends most of its time
there. `BulkTableWriter.write` does the same two things for many keys at once: it appends the changelog
records to one aiokafka batch per partition and, once a partition's batches are acknowledged, sets
the values in the table's store (inside an event context naming the partition, which the RocksDB
store needs) and records the persisted changelog offset, as faust does, so a RocksDB store recovers
from where it stopped. It returns after every delivery, so the caller acks its input only after the
changelog is durable.

The store follows the changelog, never leads it: a row stored before its record is acknowledged
would survive a kill -9 in a RocksDB store, and its applied offset would make the re-delivered plays
look counted, so they would never reach the changelog. Each partition's rows are stored by a done
callback of its last batch's delivery future, which runs in acknowledgement order (one partition's
batches are acknowledged in order), so two writes of the same row land in the store in changelog
order. Readers of rows being written are served from the caller's decoded rows meanwhile.

Writes of one writer reach the changelog one after another: a write's batches are sent under a lock,
so no other write's records land between them (aiokafka's `send_batch` waits for a partition's pending
batch to drain, and two writes that interleaved there put an older row after a newer one: the
lifecycle test's day 3 lost 11 streams that way when a restore's rewrite of a partition's rows, many
batches, ran beside the fold-ins). `write_current` builds its rows under that lock, after every earlier
write is acknowledged (and so stored): a row it reads is the latest the changelog has, and a later write
lands after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from faust.streams import _current_event
from faust.types import TP, Message

log = logging.getLogger(__name__)


#: A changelog send or delivery still waiting after this many seconds is logged (and again each period).
SLOW_WRITE_S = 10.0
#: A changelog send or delivery still waiting after this many seconds fails the write, which stops the
#: worker (its batches stay unacked: re-delivered to the worker that takes the partitions over, or to this
#: one once its supervisor restarts it). aiokafka fails a batch it cannot deliver after its request timeout
#: (90 s here); a write waiting far longer sits in a wedged producer, and a worker that keeps counting
#: without ever committing is worse than a restart.
WRITE_DEADLINE_S = 180.0


class ChangelogWriteError(RuntimeError):
    """A changelog write did not complete within WRITE_DEADLINE_S."""


async def _logged(awaitable: Any, producer: Any, topic: str, partition: int, step: str) -> Any:
    """Await a producer step ("send": into the accumulator, "delivery": the broker's ack), logging a
    warning with the producer's state every SLOW_WRITE_S while it waits: writes were seen waiting for a
    drain that never came (at a stop, and once in a running worker)."""
    task = asyncio.ensure_future(awaitable)
    waited = 0.0
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(task), SLOW_WRITE_S)
        except asyncio.TimeoutError:
            waited += SLOW_WRITE_S
            state = producer_state(producer, topic, partition)
            if waited >= WRITE_DEADLINE_S:
                task.cancel()
                raise ChangelogWriteError(
                    f"changelog write to {topic}[{partition}] waited {waited:.0f} s for its {step} ({state}); "
                    "failing it: the worker stops, its batches stay unacked and are re-delivered"
                ) from None
            log.warning(
                "changelog write to %s[%d] still waiting for its %s after %.0f s (%s)",
                topic,
                partition,
                step,
                waited,
                state,
            )


def producer_state(producer: Any, topic: str, partition: int) -> str:
    """What an aiokafka producer knows and holds for one partition (for diagnosing a stalled write)."""
    try:
        from aiokafka.structs import TopicPartition

        tp = TopicPartition(topic, partition)
        sender = producer._sender
        routine = sender.sender_task
        return (
            f"leader {producer.client.cluster.leader_for_partition(tp)}, "
            f"batches queued {len(producer._message_accumulator._batches.get(tp, ()))}, "
            f"muted {tp in sender._muted_partitions}, in flight to nodes {sorted(sender._in_flight)}, "
            f"sender running {routine is not None and not routine.done()}, "
            f"metadata update pending {producer.client._md_update_fut is not None}"
        )
    except Exception as exc:  # diagnostics only: aiokafka internals may change
        return f"state unavailable: {type(exc).__name__}: {exc}"


Entries = list[tuple[bytes, bytes, int]]


class BulkTableWriter:
    """Write many (key, value, partition) entries of one raw-bytes table at once."""

    def __init__(self, app: Any, table: Any, source_topic: str) -> None:
        self.app = app
        self.table = table
        self.source_topic = source_topic
        self._sending = asyncio.Lock()  # one write's batches at a time, in the order writes asked
        self._in_flight: set[asyncio.Future] = set()  # deliveries not yet acknowledged (or failed)
        self._owner: asyncio.Task | None = None  # the task inside write_current (it holds the lock)

    @contextlib.contextmanager
    def _partition_context(self, partition: int) -> Iterator[None]:
        message = Message(self.source_topic, partition, -1, time.time(), 0, [], None, None, None)
        event = self.app.create_event(None, None, [], message)
        token = _current_event.set(weakref.ref(event))
        try:
            yield
        finally:
            _current_event.reset(token)

    async def write(self, entries: Entries) -> None:
        """Make `key -> value` durable in the changelog (partition per entry), then set it in the store."""
        if not entries:
            return
        if self._owner is not None and self._owner is asyncio.current_task():
            pending = await self._send_all(entries)  # inside write_current: it holds the lock
        else:
            async with self._sending:
                pending = await self._send_all(entries)
        await self._delivered(pending)

    async def write_current(self, build: Callable[[], Entries]) -> int:
        """Write the entries `build()` returns, built once every earlier write of this writer is
        acknowledged and stored and before any later one is sent (so rows read from the store or a
        cache are not older than anything in the changelog); returns how many."""
        async with self._sending:
            self._owner = asyncio.current_task()
            try:
                if self._in_flight:
                    await asyncio.wait(set(self._in_flight))  # (their store callbacks run first)
                entries = build()
                await self.write(entries)  # (through `write`, which sees that this task holds the lock)
            finally:
                self._owner = None
        return len(entries)

    async def _send_all(self, entries: Entries) -> list[tuple[asyncio.Future, int]]:
        by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for key, value, partition in entries:
            by_partition[partition].append((key, value))
        producer = self.app.producer._ensure_producer()
        topic = self.table.changelog_topic.get_topic_name()
        pending: list[tuple[asyncio.Future, int]] = []
        for partition, pairs in by_partition.items():
            sent: list[asyncio.Future] = []
            batch, count = producer.create_batch(), 0
            for key, value in pairs:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full: ship it
                    batch.close()
                    sent.append(await self._send(producer, batch, topic, partition))
                    batch, count = producer.create_batch(), 0
                    batch.append(key=key, value=value, timestamp=None)
                count += 1
            batch.close()
            sent.append(await self._send(producer, batch, topic, partition))
            sent[-1].add_done_callback(functools.partial(self._store, TP(topic, partition), pairs, sent, count))
            for future in sent:
                self._in_flight.add(future)
                future.add_done_callback(self._in_flight.discard)
            pending.extend((future, partition) for future in sent)
        return pending

    async def _delivered(self, pending: list[tuple[asyncio.Future, int]]) -> None:
        if not pending:
            return
        producer = self.app.producer._ensure_producer()
        topic = self.table.changelog_topic.get_topic_name()
        for future, partition in pending:
            await _logged(future, producer, topic, partition, "delivery")

    @staticmethod
    async def _send(producer: Any, batch: Any, topic: str, partition: int) -> asyncio.Future:
        return await _logged(producer.send_batch(batch, topic, partition=partition), producer, topic, partition, "send")

    def _store(
        self, tp: TP, pairs: list[tuple[bytes, bytes]], sent: list[asyncio.Future], last_count: int, _: Any
    ) -> None:
        """Done callback of a partition's last batch: store its rows once every batch is acknowledged."""
        if not all(f.done() and not f.cancelled() and f.exception() is None for f in sent):
            return  # not durable: the write fails, the store keeps the rows the changelog has
        store = self.table.data
        with self._partition_context(tp.partition):
            for key, value in pairs:
                store[key] = value
        store.set_persisted_offset(tp, sent[-1].result().offset + last_count - 1)
