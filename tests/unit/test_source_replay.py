"""SourceReplay's decisions (stream/source_replay.py): which partitions are read again, from where, and
when a restore counts as done and is recorded. The real-broker test is
tests/integration/test_local_state.py::test_changelog_emptied_by_retention."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from stream.codec import pack_message
from stream.source_replay import SourceReplay, decode_repair

CHANGELOG, PLAYS, FORWARD = "app-user-state-changelog", "plays", "plays.repartition"


class Offsets:
    """The consumer calls SourceReplay makes: earliest and end offsets per partition."""

    def __init__(self, earliest: dict[TP, int], end: dict[TP, int]) -> None:
        self.earliest, self.end = earliest, end

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.earliest.get(tp, 0) for tp in tps}

    async def highwaters(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.end.get(tp, 0) for tp in tps}


def replay(earliest: dict[TP, int], end: dict[TP, int], repairs: list | None = None):
    sent: list[tuple[int, dict]] = []

    async def send(partition: int, value: bytes) -> None:
        from stream.codec import unpack_message

        sent.append((partition, unpack_message(value)))

    async def read_repairs() -> list:
        return repairs or []

    async def rewrite(partition: int) -> int:  # the worker's rows of the partition, written again
        sent.append((partition, "rows"))
        return 3

    app = SimpleNamespace(consumer=Offsets(earliest, end))
    return SourceReplay(app, CHANGELOG, PLAYS, FORWARD, send, read_repairs, rewrite), sent


def record(topic: str, partition: int, offset: int):
    return SimpleNamespace(topic=topic, partition=partition, offset=offset)


def assigned(*partitions: int) -> set[TP]:
    return {TP(PLAYS, p) for p in partitions} | {TP(FORWARD, p) for p in partitions}


def test_nothing_is_read_again_while_the_changelog_starts_at_zero():
    source, _ = replay({}, {TP(PLAYS, 0): 100})
    assert asyncio.run(source.rewinds(assigned(0, 1))) == {}
    assert source.restoring() == []


def test_a_partition_that_lost_records_is_read_again_and_recorded_once_durable():
    earliest = {TP(CHANGELOG, 1): 40, TP(PLAYS, 1): 0, TP(FORWARD, 1): 5}
    end = {TP(PLAYS, 1): 100, TP(FORWARD, 1): 9}
    source, sent = replay(earliest, end)

    async def scenario():
        rewinds = await source.rewinds(assigned(0, 1))
        assert rewinds == {TP(PLAYS, 1): 0, TP(FORWARD, 1): 5}
        assert source.restoring() == [1]
        assert source.unrecoverable == 5  # the forwarded plays before offset 5 are gone
        done = asyncio.get_running_loop().create_future()
        source.track([record(PLAYS, 1, 98), record(PLAYS, 0, 500)], done)
        source.track([record(FORWARD, 1, 8)], None)  # nothing to write: read again at once
        done.set_result(True)
        await asyncio.sleep(0)
        assert sent == []  # plays[1] reached 98, its end is 100: not yet
        last = asyncio.get_running_loop().create_future()
        source.track([record(PLAYS, 1, 99)], last)
        await asyncio.sleep(0)
        assert sent == []  # not durable yet
        last.set_result(True)
        for _ in range(3):
            await asyncio.sleep(0)
        assert sent[0] == (1, "rows")  # every row of the partition is written again, then the record
        assert [(p, body["log_start"]) for p, body in sent[1:]] == [(1, 40)]
        assert source.restoring() == [] and source.completed == 1
        assert await source.rewinds(assigned(0, 1)) == {}  # recorded: not read again

    asyncio.run(scenario())


def test_a_failed_batch_does_not_count_and_a_recorded_restore_is_honoured():
    earliest = {TP(CHANGELOG, 2): 7}
    end = {TP(PLAYS, 2): 10}
    marker = SimpleNamespace(key=b"2", value=pack_message({"partition": 2, "log_start": 7}), partition=0, offset=0)
    source, _ = replay(earliest, end, repairs=[marker])
    assert asyncio.run(source.rewinds(assigned(2))) == {}  # another worker restored it already
    source, sent = replay(earliest, end)

    async def scenario():
        assert await source.rewinds(assigned(2)) == {TP(PLAYS, 2): 0}
        failed = asyncio.get_running_loop().create_future()
        source.track([record(PLAYS, 2, 9)], failed)
        failed.set_exception(RuntimeError("changelog write failed"))
        await asyncio.sleep(0)
        assert sent == [] and source.restoring() == [2]
        assert await source.rewinds(assigned(3)) == {}  # partition 2 moved away: its next owner restores it
        assert source.restoring() == []

    asyncio.run(scenario())


def test_malformed_repairs_records_are_ignored():
    assert decode_repair(b"1", b"\x00garbage") is None
    assert decode_repair(b"1", pack_message({"partition": -1, "log_start": 3})) is None
    assert decode_repair(b"1", pack_message({"partition": 1, "log_start": 3})) == (1, 3)
