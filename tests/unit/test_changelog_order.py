"""The table store follows the changelog (stream.changelog.BulkTableWriter): a row is stored only once
its changelog record is acknowledged, two writes of one row land in the store in changelog order, and
two writes never interleave their batches in the changelog."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import faust
import pytest

from stream.changelog import BulkTableWriter

TOPIC = "app-user-state-changelog"


class FakeBatch:
    def __init__(self, capacity: int) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.capacity = capacity

    def append(self, key: bytes, value: bytes, timestamp: None) -> object | None:
        if len(self.records) == self.capacity:
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        pass


class FakeProducer:
    """Batches are acknowledged when the test says so (`ack`), with consecutive offsets per partition."""

    def __init__(self, capacity: int = 100, yielding: bool = False) -> None:
        self.capacity = capacity
        self.yielding = yielding  # send_batch yields first, as aiokafka's does while a batch waits to drain
        self.sent: list[tuple[int, FakeBatch, asyncio.Future]] = []
        self.next_offset: dict[int, int] = {}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, partition: int) -> asyncio.Future:
        if self.yielding:
            await asyncio.sleep(0)
        future = asyncio.get_running_loop().create_future()
        self.sent.append((partition, batch, future))
        return future

    def ack(self, index: int) -> None:
        partition, batch, future = self.sent[index]
        base = self.next_offset.get(partition, 0)
        self.next_offset[partition] = base + len(batch.records)
        future.set_result(SimpleNamespace(offset=base))

    def fail(self, index: int) -> None:
        self.sent[index][2].set_exception(RuntimeError("broker gone"))


class RecordingStore(dict):
    def __init__(self) -> None:
        super().__init__()
        self.offsets: dict[int, int] = {}

    def set_persisted_offset(self, tp, offset: int) -> None:
        self.offsets[tp.partition] = offset


def _writer(producer: FakeProducer) -> tuple[BulkTableWriter, RecordingStore]:
    app = faust.App("changelog-order", broker="kafka://127.0.0.1:9")
    store = RecordingStore()
    table = SimpleNamespace(data=store, changelog_topic=SimpleNamespace(get_topic_name=lambda: TOPIC))
    fake_app = SimpleNamespace(
        create_event=app.create_event, producer=SimpleNamespace(_ensure_producer=lambda: producer)
    )
    return BulkTableWriter(fake_app, table, "plays"), store


async def _until(condition) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_rows_are_stored_only_after_their_changelog_records_are_acknowledged():
    async def scenario() -> None:
        producer = FakeProducer(capacity=2)
        writer, store = _writer(producer)
        entries = [(b"a", b"1", 0), (b"b", b"2", 0), (b"c", b"3", 0), (b"d", b"4", 1)]
        task = asyncio.ensure_future(writer.write(entries))
        await _until(lambda: len(producer.sent) == 3)  # partition 0: two batches (capacity 2), 1: one
        assert dict(store) == {} and store.offsets == {}, "rows stored before the changelog has them"
        producer.ack(0)
        await asyncio.sleep(0)
        assert dict(store) == {}, "partition 0 stored before its last batch was acknowledged"
        producer.ack(1)
        producer.ack(2)
        await task
        assert dict(store) == {b"a": b"1", b"b": b"2", b"c": b"3", b"d": b"4"}
        assert store.offsets == {0: 2, 1: 0}  # the offset of each partition's last record

    asyncio.run(scenario())


def test_a_failed_delivery_stores_nothing_of_its_partition():
    async def scenario() -> None:
        producer = FakeProducer()
        writer, store = _writer(producer)
        task = asyncio.ensure_future(writer.write([(b"a", b"1", 0), (b"b", b"2", 1)]))
        await _until(lambda: len(producer.sent) == 2)
        producer.fail(0)
        producer.ack(1)
        with pytest.raises(RuntimeError, match="broker gone"):
            await task
        assert dict(store) == {b"b": b"2"} and store.offsets == {1: 0}

    asyncio.run(scenario())


def test_two_writes_of_one_row_are_stored_in_changelog_order():
    """Write 1 covers partitions 0 and 1, write 2 (a later value of the same row) partition 0 only; the
    broker acknowledges partition 0's batches in order before write 1's partition 1: the store ends
    with write 2's value, as the changelog does."""

    async def scenario() -> None:
        producer = FakeProducer()
        writer, store = _writer(producer)
        first = asyncio.ensure_future(writer.write([(b"row", b"old", 0), (b"other", b"x", 1)]))
        await _until(lambda: len(producer.sent) == 2)
        second = asyncio.ensure_future(writer.write([(b"row", b"new", 0)]))
        await _until(lambda: len(producer.sent) == 3)
        producer.ack(0)  # write 1, partition 0
        producer.ack(2)  # write 2, partition 0
        await second
        producer.ack(1)  # write 1, partition 1
        await first
        assert store[b"row"] == b"new"
        assert store.offsets == {0: 1, 1: 0}

    asyncio.run(scenario())


def _changelog(producer: FakeProducer, partition: int = 0) -> list[tuple[bytes, bytes]]:
    return [record for p, batch, _ in producer.sent if p == partition for record in batch.records]


def test_two_writes_never_interleave_their_batches():
    """Write 1 (a restore's rewrite of many rows, three batches, an older value of `row` in its last)
    and write 2 (a fold-in's newer value of `row`) start together: write 2's records follow all of
    write 1's, so the changelog's last `row` is the newer one. Interleaved, the older value came last
    and the streams it lacked were lost (the lifecycle test's day 3)."""

    async def scenario() -> None:
        producer = FakeProducer(capacity=2, yielding=True)
        writer, store = _writer(producer)
        rewrite = [(b"u1", b"1", 0), (b"u2", b"2", 0), (b"u3", b"3", 0), (b"u4", b"4", 0), (b"row", b"old", 0)]
        first = asyncio.ensure_future(writer.write(rewrite))
        second = asyncio.ensure_future(writer.write([(b"row", b"new", 0)]))
        await _until(lambda: len(producer.sent) == 4)
        for index in range(4):
            producer.ack(index)
        await asyncio.gather(first, second)
        log = _changelog(producer)
        assert log == [*[(k, v) for k, v, _ in rewrite], (b"row", b"new")], log
        assert store[b"row"] == b"new"

    asyncio.run(scenario())


def test_write_current_builds_its_rows_after_earlier_writes_are_stored():
    """A rewrite of the stored rows (write_current) started while a write of a newer value is still
    unacknowledged reads the store only once that write is stored: it writes the newer value again."""

    async def scenario() -> None:
        producer = FakeProducer(yielding=True)
        writer, store = _writer(producer)
        store[b"row"] = b"old"
        newer = asyncio.ensure_future(writer.write([(b"row", b"new", 0)]))
        await _until(lambda: len(producer.sent) == 1)
        rewrite = asyncio.ensure_future(writer.write_current(lambda: [(k, v, 0) for k, v in store.items()]))
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(producer.sent) == 1, "the rewrite read the store before the earlier write was stored"
        producer.ack(0)
        await newer
        await _until(lambda: len(producer.sent) == 2)
        producer.ack(1)
        assert await rewrite == 1
        assert _changelog(producer) == [(b"row", b"new"), (b"row", b"new")]

    asyncio.run(scenario())
