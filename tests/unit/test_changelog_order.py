"""The table store follows the changelog (stream.changelog.BulkTableWriter): a row is stored only once
its changelog record is acknowledged, and two writes of one row land in the store in changelog order."""

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

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.sent: list[tuple[int, FakeBatch, asyncio.Future]] = []
        self.next_offset: dict[int, int] = {}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, partition: int) -> asyncio.Future:
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
