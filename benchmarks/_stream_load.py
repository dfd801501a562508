"""Load generators of benchmarks/stream_throughput.py: Last.fm-shaped play events into Kafka.

Events: the user is an existing Last.fm 2K user with probability 2/3, else one of ``--new-users``
(20 000) new users ``new-<run>-<i>``; the artist is the artist of a uniformly drawn row of
``user_artists.dat`` (so artists come with their listener-count popularity); ``ms_played`` 200 000,
``ts`` = now; encoded with ``stream.events.encode_play`` and keyed by user.  Records go to the
partition of Kafka's default partitioner (``murmur2(key) & 0x7fffffff % partitions``, what the worker
expects), appended with aiokafka's batch API (one ``BatchBuilder`` per partition, no future per
record, as benchmarks/stream_ingest.py does); ``linger_ms=50``, 1 MB batches, ``acks=1``.

Run as a script (one JSON line on stdout at the end):

    python benchmarks/_stream_load.py bulk --bootstrap B --topic T --events N --seed S --run R
    python benchmarks/_stream_load.py rate --bootstrap B --topic T --rate 20000 --seed S --run R
        # produces at --rate events/s until its stdin is closed (or --duration seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("PLAYREC_DATA", ROOT.parent / "shared" / "data"))
LASTFM = DATA / "lastfm-2k" / "user_artists.dat"
MS_PLAYED = 200_000


def load_lastfm(path: Path = LASTFM) -> tuple[list[str], list[str]]:
    """(distinct user ids, the artist id of every row) of a Last.fm ``user_artists.dat``."""
    users: dict[str, None] = {}
    artists: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or not parts[0].isdigit():
                continue  # header
            users[parts[0]] = None
            artists.append(parts[1])
    return list(users), artists


class EventSource:
    """Draws (user, artist) pairs: 2/3 existing users, 1/3 new ones, artists by row."""

    def __init__(self, run: str, seed: int, new_users: int = 20_000, path: Path = LASTFM) -> None:
        self.users, self.artists = load_lastfm(path)
        self.new_users = [f"new-{run}-{i}" for i in range(new_users)]
        self.rng = random.Random(seed)

    def draw(self) -> tuple[str, str]:
        rng = self.rng
        if rng.random() < 2 / 3:
            user = self.users[int(rng.random() * len(self.users))]
        else:
            user = self.new_users[int(rng.random() * len(self.new_users))]
        return user, self.artists[int(rng.random() * len(self.artists))]


class BatchSender:
    """Appends records to one aiokafka batch per partition and ships full batches."""

    def __init__(self, producer: Any, topic: str, partitions: int) -> None:
        from kafka.partitioner.default import murmur2

        self.producer, self.topic, self.n = producer, topic, partitions
        self.murmur2 = murmur2
        self.partition_of: dict[bytes, int] = {}
        self.builders = {p: producer.create_batch() for p in range(partitions)}
        self.pending: list[asyncio.Future] = []
        self.count = 0

    async def add(self, key: bytes, value: bytes) -> None:
        p = self.partition_of.get(key)
        if p is None:
            p = self.partition_of[key] = (self.murmur2(key) & 0x7FFFFFFF) % self.n
        builder = self.builders[p]
        if builder.append(key=key, value=value, timestamp=None) is None:  # full: ship it
            await self._ship(p)
            self.builders[p].append(key=key, value=value, timestamp=None)
        self.count += 1

    async def _ship(self, p: int) -> None:
        builder = self.builders[p]
        self.builders[p] = self.producer.create_batch()
        builder.close()
        self.pending.append(await self.producer.send_batch(builder, self.topic, partition=p))
        if len(self.pending) > 256:
            done = [f for f in self.pending if f.done()]
            for f in done:
                f.result()  # raise delivery errors
            self.pending = [f for f in self.pending if not f.done()]

    async def flush(self) -> None:
        for p, builder in list(self.builders.items()):
            if builder.record_count():
                await self._ship(p)
        await asyncio.gather(*self.pending)
        self.pending = []


async def _producer(bootstrap: str) -> Any:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=50,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    return producer


async def produce_bulk(
    bootstrap: str, topic: str, events: int, seed: int, run: str, partitions: int, event_ids: bool = False
) -> dict:
    """Produce ``events`` events as fast as possible (each with a unique ``event_id`` if ``event_ids``);
    return count and seconds."""
    from stream.events import encode_play

    source = EventSource(run, seed)
    producer = await _producer(bootstrap)
    started = time.monotonic()
    try:
        sender = BatchSender(producer, topic, partitions)
        draw = source.draw
        for i in range(events):
            user, artist = draw()
            if i % 1024 == 0:
                now_ms = int(time.time() * 1000)
            key, value = encode_play(user, artist, now_ms, MS_PLAYED, f"{run}-{seed}-{i}" if event_ids else None)
            await sender.add(key, value)
        await sender.flush()
    finally:
        await producer.stop()
    seconds = time.monotonic() - started
    return {"events": sender.count, "seconds": seconds, "rate": sender.count / seconds}


async def produce_rate(
    bootstrap: str,
    topic: str,
    rate: float,
    seed: int,
    run: str,
    partitions: int,
    stop: threading.Event,
    tick: float,
    event_ids: bool = False,
) -> dict:
    """Produce at ``rate`` events/s (in ``tick``-second slices) until ``stop`` is set."""
    from stream.events import encode_play

    source = EventSource(run, seed)
    producer = await _producer(bootstrap)
    try:
        sender = BatchSender(producer, topic, partitions)
        draw = source.draw
        started = time.monotonic()
        behind_max = 0
        while not stop.is_set():
            now = time.monotonic()
            due = int((now - started) * rate) - sender.count
            behind_max = max(behind_max, due)
            now_ms = int(time.time() * 1000)
            for _ in range(due):
                user, artist = draw()
                event_id = f"{run}-{seed}-r{sender.count}" if event_ids else None
                key, value = encode_play(user, artist, now_ms, MS_PLAYED, event_id)
                await sender.add(key, value)
            for p, builder in list(sender.builders.items()):  # ship every tick: no extra latency
                if builder.record_count():
                    await sender._ship(p)
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - now)))
        seconds = time.monotonic() - started
        await sender.flush()
    finally:
        await producer.stop()
    return {
        "events": sender.count,
        "seconds": seconds,
        "rate": sender.count / seconds,
        "target_rate": rate,
        "max_backlog_events": behind_max,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("bulk", "rate"))
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--run", required=True, help="run id (names the new users)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--events", type=int, default=1_000_000, help="bulk: events to produce")
    parser.add_argument("--rate", type=float, default=20_000.0, help="rate: events per second")
    parser.add_argument("--tick", type=float, default=0.01, help="rate: seconds per produce slice")
    parser.add_argument("--duration", type=float, default=None, help="rate: stop after this many seconds")
    parser.add_argument("--event-ids", type=int, default=0, help="1: every event carries a unique event_id")
    args = parser.parse_args(argv)
    ids = bool(args.event_ids)
    if args.mode == "bulk":
        result = asyncio.run(
            produce_bulk(args.bootstrap, args.topic, args.events, args.seed, args.run, args.partitions, ids)
        )
    else:
        stop = threading.Event()

        def wait_for_stop() -> None:
            if args.duration is not None:
                time.sleep(args.duration)
            else:
                sys.stdin.read()  # returns when the parent closes our stdin
            stop.set()

        threading.Thread(target=wait_for_stop, daemon=True).start()
        result = asyncio.run(
            produce_rate(
                args.bootstrap, args.topic, args.rate, args.seed, args.run, args.partitions, stop, args.tick, ids
            )
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
