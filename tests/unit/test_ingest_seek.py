"""A fetch that overlaps a seek (stream.ingest.BatchingConsumerMixin): its records must not be handed on
out of offset order.

The consumer runs the real drain loop, `_ingest_records`, `perform_seek` (with a seek hook, as the worker
has) and faust's own `Consumer.perform_seek` over a small in-memory partition log whose fetch position
moves like aiokafka's. The race is the one CI hit at a rebalance: after a new assignment faust resumes the
flow before its seek to the committed offsets, so the drain loop buffers records from the committed
offset and fetches the next ones; the seek then drops the buffer and moves the position back, and that
fetch (read from the position before the seek) is handled after it. Handed on, its records made the
records in between look delivered: they were skipped when fetched again and the commit passed them
(plays lost for good).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP

from stream.ingest import _SEEK_HOOKS_ATTR, _SINKS_ATTR, BatchingConsumerMixin, BatchIngest

TOPIC = "plays"
PART = TP(TOPIC, 0)
COMMITTED, END = 3254, 3400


class _Record(SimpleNamespace):
    pass


class _Log:
    """One partition's records and a fetch position (aiokafka's, in the consumer thread)."""

    def __init__(self, missing: range = range(0)) -> None:
        self.position = COMMITTED  # a new assignment starts from the committed offset
        self.missing = missing  # offsets the log has no record at (transaction markers, compaction)
        self.seeks: list[int] = []

    def fetch(self, limit: int = 40) -> list[_Record]:
        upto = min(END, self.position + limit)
        offsets = [o for o in range(self.position, upto) if o not in self.missing]
        records = [_Record(topic=TOPIC, partition=0, offset=o, key=b"u", value=b"") for o in offsets]
        self.position = upto
        return records


class _Base:
    """What the mixin uses of faust's Consumer, over `_Log`; `perform_seek` is faust's own."""

    perform_seek = FaustConsumer.perform_seek

    def __init__(self, app: Any, log: _Log, race: bool) -> None:
        self.app, self.log_, self.race = app, log, race
        self._read_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._committed_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._acked: dict[TP, list[int]] = defaultdict(list)
        self._acked_index: dict[TP, set[int]] = defaultdict(set)
        self._n_acked, self._commit_every, self._waiting_for_ack = 0, None, None
        self._buffered_partitions: set[TP] = set()
        self._stopped = asyncio.Event()
        self.flow_active, self.should_stop = True, False
        self.diag = SimpleNamespace(set_flag=lambda _: None, unset_flag=lambda _: None)
        self.consumer_stopped_errors = ()
        self.transport = SimpleNamespace(app=app)
        self.gaps: list[tuple[int, int]] = []
        self.calls = 0

    def assignment(self) -> set[TP]:
        return {PART}

    def _get_active_partitions(self) -> set[TP]:
        return {PART}

    def pause_partitions(self, tps: Any) -> None:
        pass

    def resume_partitions(self, tps: Any) -> None:
        pass

    def highwater(self, tp: TP) -> int:
        return END

    async def seek_to_committed(self) -> dict[TP, int]:
        await asyncio.sleep(0)
        self.log_.position = COMMITTED
        self.log_.seeks.append(COMMITTED)
        return {PART: COMMITTED}

    async def seek(self, tp: TP, offset: int) -> None:
        self.log_.position = offset
        self.log_.seeks.append(offset)
        self._read_offset[tp] = offset

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return dict.fromkeys(tps, 0)

    async def _add_gap(self, tp: TP, start: int, stop: int) -> None:
        self.gaps.append((start, stop))

    async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[_Record]], None]:
        self.calls += 1
        if self.calls == 2 and self.race:
            stale = self.log_.fetch()  # read from the position before the seek ...
            await self.perform_seek()  # ... which the end of recovery runs before the result is handled
            return {PART: stale}, None
        records = self.log_.fetch()
        if not records:
            self._stopped.set()
        return ({PART: records} if records else {}), None


class _Consumer(BatchingConsumerMixin, _Base):
    pass


def _app(handed: list[int]) -> Any:
    async def ebb() -> None:
        return None

    app = SimpleNamespace(
        consumer_generation_id=3,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
        monitor=SimpleNamespace(track_tp_end_offset=lambda tp, offset: None, stream_inbound_time={}),
        producer=SimpleNamespace(buffer=SimpleNamespace(wait_until_ebb=ebb)),
    )

    async def handler(batch: list[Any]) -> None:
        handed.extend(r.offset for r in batch)

    sink = BatchIngest.__new__(BatchIngest)
    sink.app, sink.topic_name, sink.handler, sink.ready = app, TOPIC, handler, None
    sink.max_batch, sink.max_latency_s = 10_000, 3600.0  # handed on at the end: the race keeps a buffer
    sink.buffer, sink.generation, sink.first_at, sink.batches, sink.events = [], None, 0.0, 0, 0
    setattr(app, _SINKS_ATTR, {TOPIC: sink})

    async def hook(assignment: set[TP]) -> dict[TP, int]:
        return {}

    setattr(app, _SEEK_HOOKS_ATTR, [hook])
    return app


def _run(race: bool = True, missing: range = range(0)) -> tuple[list[int], _Consumer]:
    handed: list[int] = []

    async def main() -> _Consumer:
        app = _app(handed)
        consumer = _Consumer(app, _Log(missing), race)
        await consumer._drain_messages(SimpleNamespace(_stopped=asyncio.Event()))
        sink = getattr(app, _SINKS_ATTR)[TOPIC]
        sink.max_latency_s = 0.0
        await consumer._ingest_flush(sink)
        return consumer

    consumer = asyncio.run(main())
    return handed, consumer


def test_a_fetch_read_before_a_seek_does_not_make_the_records_after_the_committed_offset_look_delivered() -> None:
    handed, consumer = _run()
    missing = sorted(set(range(COMMITTED, END)) - set(handed))
    assert not missing, f"{len(missing)} records never handed on ({missing[0]}..{missing[-1]}), gaps {consumer.gaps}"
    # in offset order: a record is handed on only after every earlier one (counting skips what is below
    # a user's applied offset, so a later record first would make the earlier ones look counted)
    seen = COMMITTED - 1
    for offset in handed:
        assert offset <= seen + 1, f"{offset} handed on before {seen + 1}"
        seen = max(seen, offset)
    assert not consumer.gaps, "a faust gap over records that exist lets the commit pass them"


def test_the_stale_fetch_is_fetched_again_from_the_partitions_next_offset() -> None:
    _, consumer = _run()
    assert consumer.log_.seeks == [COMMITTED, COMMITTED]  # the recovery's seek, then the drain loop's


def test_a_hole_in_a_fetch_after_the_seek_is_a_gap_the_commit_may_pass() -> None:
    handed, consumer = _run(race=False, missing=range(3300, 3305))
    assert handed == [o for o in range(COMMITTED, END) if not 3300 <= o < 3305]
    assert consumer.gaps == [(3300, 3305)]  # faust's _add_gap(from, to): offsets from..to, `to` a record
    assert consumer.log_.seeks == []
