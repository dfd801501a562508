"""Changelog records fetched but not delivered are fetched again (stream.ingest.BatchingConsumerMixin).

The race behind the take-over recovery hang (issue #13; CI, December 2026): a fetch is in flight in the
consumer thread when a rebalance stops the flow; the recovery seeks a changelog partition that this worker
now owns actively to its start, and aiokafka returns the records from there to that same fetch, still
waiting. The drain loop (like faust's) drops a fetch result that arrives while the flow is stopped; the
partition's position is past the records by then, so the recovery never received them: it waited forever
("No event received for active tp ... since recovery start") or completed without the rows. Here the drain
loop runs over an in-memory changelog partition whose position moves like aiokafka's, and the consumer
thread is a stand-in with aiokafka's subscription state.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP

from stream.ingest import _SINKS_ATTR, BatchingConsumerMixin, BatchIngest

PLAYS = "plays"
CHANGELOG = TP("playrec-counts-changelog", 0)
END = 50


class _Record(SimpleNamespace):
    pass


class _State:
    """aiokafka's TopicPartitionState: a fetch position."""

    def __init__(self) -> None:
        self.position = 0
        self.has_valid_position = True


class _AiokafkaConsumer:
    """What `_redo_changelogs` uses of aiokafka's consumer: the assignment's states and `seek`."""

    def __init__(self, assigned: bool = True) -> None:
        self.state = _State()
        self.seeks: list[int] = []
        tps = {CHANGELOG} if assigned else set()
        assignment = SimpleNamespace(tps=tps, state_value=lambda tp: self.state)
        self._subscription = SimpleNamespace(subscription=SimpleNamespace(assignment=assignment))

    def seek(self, tp: TP, offset: int) -> None:
        self.state.position = offset
        self.seeks.append(offset)

    def fetch(self) -> list[_Record]:
        start, self.state.position = self.state.position, END
        return [_Record(topic=CHANGELOG.topic, partition=0, offset=o, key=b"k", value=b"v") for o in range(start, END)]


class _Thread:
    def __init__(self, consumer: _AiokafkaConsumer) -> None:
        self.consumer = consumer

    def _ensure_consumer(self) -> _AiokafkaConsumer:
        return self.consumer

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        return await fun(*args)


class _Base:
    """What the mixin uses of faust's Consumer; `perform_seek` is faust's own (nothing committed)."""

    perform_seek = FaustConsumer.perform_seek

    def __init__(self, app: Any, aiokafka: _AiokafkaConsumer, race: bool) -> None:
        self.app, self.race = app, race
        self._thread = _Thread(aiokafka)
        self._read_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._committed_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._n_acked, self._commit_every = 0, None
        self._buffered_partitions: set[TP] = set()
        self._stopped = asyncio.Event()
        self.suspend_flow = asyncio.Event()
        self.flow_active, self.should_stop = True, False
        self.diag = SimpleNamespace(set_flag=lambda _: None, unset_flag=lambda _: None)
        self.consumer_stopped_errors = ()
        self.transport = SimpleNamespace(app=app)
        self.delivered: list[int] = []
        self.calls = 0

    def assignment(self) -> set[TP]:
        return {CHANGELOG}

    def _get_active_partitions(self) -> set[TP]:
        return {CHANGELOG}

    def highwater(self, tp: TP) -> int:
        return END

    async def seek_to_committed(self) -> dict[TP, int]:
        return {}

    def _to_message(self, tp: TP, record: _Record) -> _Record:
        return record

    async def callback(self, message: _Record) -> None:  # faust's conductor
        self.delivered.append(message.offset)

    async def wait_first(self, delivery: Any, suspended: Any) -> Any:
        suspended.close()
        await delivery
        return SimpleNamespace(done={delivery})

    async def _wait_next_records(self, timeout: float) -> tuple[dict[TP, list[_Record]], set[TP]]:
        self.calls += 1
        aiokafka = self._thread.consumer
        records = aiokafka.fetch()
        if self.calls == 1 and self.race:
            self.flow_active = False  # the result came back after a rebalance stopped the flow ...
            return {CHANGELOG: records}, {CHANGELOG}
        self.flow_active = True  # ... which the recovery resumed right after
        if not records:
            self._stopped.set()
        return ({CHANGELOG: records} if records else {}), {CHANGELOG}


class _Consumer(BatchingConsumerMixin, _Base):
    pass


def _app() -> Any:
    app = SimpleNamespace(
        consumer_generation_id=3,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: False),
        monitor=SimpleNamespace(track_tp_end_offset=lambda tp, offset: None),
    )
    sink = BatchIngest.__new__(BatchIngest)  # the plays sink: its presence selects the batching drain loop
    sink.app, sink.topic_name, sink.handler, sink.ready = app, PLAYS, None, None
    sink.max_batch, sink.max_latency_s = 10_000, 3600.0
    sink.buffer, sink.generation, sink.first_at, sink.batches, sink.events = [], None, 0.0, 0, 0
    setattr(app, _SINKS_ATTR, {PLAYS: sink})
    return app


def _drain(consumer: _Consumer) -> None:
    asyncio.run(consumer._drain_messages(SimpleNamespace(_stopped=asyncio.Event())))


def test_changelog_records_dropped_while_the_flow_was_stopped_are_fetched_again_and_delivered() -> None:
    aiokafka = _AiokafkaConsumer()
    consumer = _Consumer(_app(), aiokafka, race=True)
    _drain(consumer)
    assert aiokafka.seeks == [0]
    assert consumer.delivered == list(range(END))


def test_without_the_race_nothing_is_sought() -> None:
    aiokafka = _AiokafkaConsumer()
    consumer = _Consumer(_app(), aiokafka, race=False)
    _drain(consumer)
    assert aiokafka.seeks == []
    assert consumer.delivered == list(range(END))


def test_a_position_already_moved_back_by_a_later_seek_is_left_alone() -> None:
    aiokafka = _AiokafkaConsumer()
    consumer = _Consumer(_app(), aiokafka, race=False)
    consumer._changelog_redo[CHANGELOG] = 30
    aiokafka.state.position = 10  # e.g. the next recovery sought to 10: the redo must not move it forward

    async def redo() -> None:
        await consumer._redo_changelogs()

    asyncio.run(redo())
    assert aiokafka.seeks == [] and aiokafka.state.position == 10
    assert consumer._changelog_redo == {}


def test_a_revoked_partition_is_not_sought() -> None:
    aiokafka = _AiokafkaConsumer(assigned=False)
    consumer = _Consumer(_app(), aiokafka, race=False)
    consumer._changelog_redo[CHANGELOG] = 0
    aiokafka.state.position = END

    async def redo() -> None:
        await consumer._redo_changelogs()

    asyncio.run(redo())
    assert aiokafka.seeks == []
