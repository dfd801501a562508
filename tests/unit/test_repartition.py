"""Plays produced to another partition than their user's (offline worker): forwarded through
`plays.repartition` with their source coordinates, counted once by the user's partition however often
a forwarder re-sends them, and every record of the repartition topic validated."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batch.user_state import UserState, pack_user, unpack_user
from stream.events import encode_play
from stream.repartition import SOURCE_HEADER, read_source, source_header

from .records import Record
from .test_worker_offline import store_path, worker  # noqa: F401 (fixtures)


@pytest.fixture
def wired(worker):  # noqa: F811
    """The worker with its forwarded sends and dead letters captured in memory."""
    worker.forwarded, worker.dead = [], []

    async def forward(**kwargs: Any) -> None:
        worker.forwarded.append(kwargs)

    async def dead(**kwargs: Any) -> None:
        worker.dead.append(kwargs)

    async def track_side(**kwargs: Any) -> asyncio.Future:  # plays of tracks the model does not know
        delivered = asyncio.get_running_loop().create_future()  # faust: a future resolved on delivery
        delivered.set_result(None)
        return delivered

    worker.plays_forward.send = forward
    worker.dead_letter.send = dead
    worker.track_plays.send = track_side
    return worker


def play(user: str, track: str) -> bytes:
    return encode_play(user, track, 1_700_000_000_000, 200_000)[1]


def other_partition(w, user: str) -> int:
    return (w.partitioner(user.encode()) + 1) % w.settings.partitions


def as_repartition_records(w, sends: list[dict], first_offset: int) -> list[Record]:
    """What the owner reads back: the forwarded sends as records of `plays.repartition`."""
    return [
        Record(w.topics.repartition, s["partition"], first_offset + i, s["key"], s["value"], tuple(s["headers"]))
        for i, s in enumerate(sends)
    ]


def test_a_play_on_another_partition_is_forwarded_then_counted_once(wired):
    async def scenario():
        w, user = wired, "u5"
        src = other_partition(w, user)
        plays = [Record(w.topics.plays, src, 10 + i, user.encode(), play(user, t)) for i, t in enumerate("abc")]
        assert await w.on_plays(plays) is None  # nothing counted here: acked once the forwards are flushed
        assert w.user_state(user).counts == {} and w.dead == []
        assert [(s["partition"], s["key"], dict(s["headers"])) for s in w.forwarded] == [
            (w.partitioner(user.encode()), user.encode(), {SOURCE_HEADER: f"{src}:{10 + i}".encode()}) for i in range(3)
        ]
        records = as_repartition_records(w, w.forwarded, 0)
        await w.on_forwarded_plays(records)
        # a forwarder that crashed before its commit re-sends a suffix: skipped by the source offset
        await w.on_forwarded_plays(as_repartition_records(w, w.forwarded[1:], 3))
        await w.drain_fold_ins()
        state = w.user_state(user)
        assert state.counts == {"a": 1, "b": 1, "c": 1}
        assert state.sources == {src: 12} and state.offset == -1
        assert w.metrics.registry.get_sample_value("playrec_plays_forwarded_total") == 3

    asyncio.run(scenario())


def test_direct_and_forwarded_plays_of_one_user_survive_a_restart_exactly(wired, store_path, tmp_path):  # noqa: F811
    async def scenario():
        w, user = wired, "newbie"
        home = w.partitioner(user.encode())
        P = w.settings.partitions
        sources = [(home + 1) % P, (home + 2) % P]
        direct = [Record(w.topics.plays, home, 5 + i, user.encode(), play(user, "d")) for i in range(2)]
        forwarded = [
            Record(w.topics.repartition, home, i, user.encode(), play(user, f"f{src}"), (source_header(src, off),))
            for i, (src, off) in enumerate([(sources[0], 100), (sources[1], 3), (sources[0], 101)])
        ]
        await w.on_plays(direct)
        await w.on_forwarded_plays(forwarded)
        await w.drain_fold_ins()
        row = w.users.data[user.encode()]
        state = unpack_user(row)
        assert state.counts == {"d": 2, f"f{sources[0]}": 2, f"f{sources[1]}": 1}
        assert (state.offset, state.sources) == (6, {sources[0]: 101, sources[1]: 3})
        return row

    row = asyncio.run(scenario())

    from stream.settings import WorkerSettings
    from stream.worker import StreamWorker

    again = StreamWorker(WorkerSettings(bootstrap="127.0.0.1:9", store=store_path, data_dir=tmp_path / "again"))
    again.users.data[b"newbie"] = row  # the row as recovered from the changelog
    again.written = []

    async def write(entries):
        again.written.extend(entries)

    async def track_side(**kwargs: Any) -> None:
        pass

    again.user_writer.write = write
    again.track_plays.send = track_side
    home = again.partitioner(b"newbie")
    src = (home + 1) % again.settings.partitions

    async def redelivered():
        # everything re-delivered (plays and forwards, commits lost): nothing counts twice; one new forward counts
        await again.on_plays([Record(again.topics.plays, home, 6, b"newbie", play("newbie", "d"))])
        records = [
            Record(again.topics.repartition, home, 9, b"newbie", play("newbie", "x"), (source_header(src, off),))
            for off in (100, 101, 102)
        ]
        await again.on_forwarded_plays(records)
        await again.drain_fold_ins()
        return again.user_state("newbie")

    state = asyncio.run(redelivered())
    assert state.counts == {"d": 2, f"f{src}": 2, f"f{(home + 2) % again.settings.partitions}": 1, "x": 1}
    assert state.sources[src] == 102


def test_a_keyless_play_is_counted_by_its_user(wired):
    async def scenario():
        w, user = wired, "u9"
        home = w.partitioner(user.encode())
        await w.on_plays([Record(w.topics.plays, home, 0, None, play(user, "a"))])  # already where it belongs
        await w.on_plays([Record(w.topics.plays, other_partition(w, user), 0, None, play(user, "b"))])
        assert [(s["key"], s["partition"]) for s in w.forwarded] == [(user.encode(), home)]
        await w.on_forwarded_plays(as_repartition_records(w, w.forwarded, 0))
        await w.drain_fold_ins()
        assert w.user_state(user).counts == {"a": 1, "b": 1} and w.dead == []

    asyncio.run(scenario())


def test_bad_repartition_records_go_to_the_dead_letter_topic(wired):
    async def scenario():
        w, user = wired, "u2"
        home, key = w.partitioner(b"u2"), b"u2"
        other = other_partition(w, user)
        topic = w.topics.repartition
        bad = [
            Record(topic, home, 0, key, play(user, "a")),  # produced there by hand: no header
            Record(topic, home, 1, key, play(user, "a"), ((SOURCE_HEADER, b"seven"),)),
            Record(topic, home, 2, key, play(user, "a"), ((SOURCE_HEADER, b"99:1"),)),
            Record(topic, other, 3, key, play(user, "a"), (source_header(home, 1),)),  # not the user's partition
            Record(topic, home, 4, key, play(user, "a"), (source_header(home, 1),)),  # from its own partition
            Record(topic, home, 5, key, b"\xc1", (source_header(other, 1),)),  # not msgpack
        ]
        assert await w.on_forwarded_plays(bad) is None
        reasons = [dict(d["headers"])["reason"].decode() for d in w.dead]
        assert len(reasons) == 6, reasons
        assert "without a playrec-source header" in reasons[0]
        assert "malformed" in reasons[1] and "outside" in reasons[2]
        assert "not its user's" in reasons[3] and "own user's partition" in reasons[4]
        assert "undecodable" in reasons[5]
        assert w.user_state(user).counts == {}

    asyncio.run(scenario())


def test_source_header_round_trip_and_state_stamp():
    assert read_source([source_header(3, 42)], 8) == (3, 42)
    assert isinstance(read_source([], 8), str)
    base = UserState({}, offset=4)
    grown = [base, *(base._replace(offset=o, sources=src) for o, src in ((4, {1: 0}), (4, {1: 1}), (5, {1: 1})))]
    assert [s.stamp() for s in grown] == sorted({s.stamp() for s in grown})  # strictly growing
    state = UserState({"t": 2}, offset=7, sources={2: 9, 5: 0})
    assert unpack_user(pack_user(state)).sources == {2: 9, 5: 0}
    assert unpack_user(pack_user(UserState({"t": 1}))).sources is None
