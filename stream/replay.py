"""`playrec replay`: produce play events from a data set onto the `plays` topic at a chosen rate.

- Files with a timestamp column (MovieLens 100K's `u.data`) are replayed in time order, one stream
  per row, their timestamps shifted so that the last event is "now".
- Files of counts (Last.fm 2K's `user_artists.dat`) are expanded to one event per play, interleaved in
  rounds (every pair with plays left emits one per round, in a seeded order), optionally capped per pair.

Every event carries a deterministic `event_id` (`<file stem>:<line>:<n>`), so a replay that is run
again produces the same ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from batch.plays import iter_play_rows
from stream.events import PLAYS_TOPIC, encode_play

log = logging.getLogger(__name__)

#: ms_played of replayed events: comfortably a stream (>= 30 s).
REPLAY_MS_PLAYED = 180_000


class ReplayError(RuntimeError):
    """The replay cannot run as asked."""


def replay_events(
    path: str | Path,
    max_per_pair: int | None = None,
    seed: int = 0,
    now_ms: int | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """`(key, value)` play records from a file, in replay order (see the module docstring)."""
    path = Path(path)
    rows = list(iter_play_rows(path))
    if not rows:
        raise ReplayError(f"{path}: no play rows to replay")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    stem = path.stem
    if rows[0].ts is not None:
        stamps = np.array([r.ts for r in rows], dtype=np.float64)
        scale = 1000.0 if stamps.max() < 1e11 else 1.0  # seconds or milliseconds
        shifted = now - (stamps.max() - stamps) * scale
        for i in np.argsort(stamps, kind="stable"):
            row = rows[i]
            yield encode_play(row.user, row.track, int(shifted[i]), REPLAY_MS_PLAYED, f"{stem}:{row.lineno}:0")
        return
    remaining = np.array([int(r.plays) for r in rows], dtype=np.int64)
    if max_per_pair is not None:
        remaining = np.minimum(remaining, max_per_pair)
    order = np.random.default_rng(seed).permutation(len(rows))
    emitted = np.zeros(len(rows), dtype=np.int64)
    while True:
        live = order[remaining[order] > emitted[order]]
        if live.size == 0:
            return
        for i in live:
            row = rows[i]
            yield encode_play(row.user, row.track, now, REPLAY_MS_PLAYED, f"{stem}:{row.lineno}:{emitted[i]}")
            emitted[i] += 1


def count_events(path: str | Path, max_per_pair: int | None = None) -> int:
    """How many events `replay_events` yields for a file."""
    rows = list(iter_play_rows(path))
    if rows and rows[0].ts is not None:
        return len(rows)
    plays = np.array([int(r.plays) for r in rows], dtype=np.int64)
    return int(np.minimum(plays, max_per_pair).sum() if max_per_pair is not None else plays.sum())


def run_replay(
    bootstrap: str,
    path: str | Path,
    rate: float = 0.0,
    limit: int | None = None,
    max_per_pair: int | None = None,
    topic: str = PLAYS_TOPIC,
    seed: int = 0,
    show_progress: bool = True,
    producer_config: dict | None = None,
) -> int:
    """Produce the events of `path` to `topic`; `rate` events/s (0 = as fast as possible). Returns the count."""
    from kafka import KafkaProducer

    if rate < 0:
        raise ReplayError(f"rate must be >= 0 events/s, got {rate}")
    total = count_events(path, max_per_pair)
    if limit is not None:
        total = min(total, limit)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024, acks="all", **(producer_config or {})
    )
    sent = 0
    start = time.monotonic()
    try:
        with tqdm(total=total, desc=f"replay {Path(path).name}", unit="ev", disable=not show_progress) as bar:
            for key, value in replay_events(path, max_per_pair, seed):
                if sent >= total:
                    break
                if rate > 0:
                    due = start + sent / rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                producer.send(topic, key=key, value=value)
                sent += 1
                if sent % 1000 == 0:
                    bar.update(1000)
            bar.update(sent % 1000)
        producer.flush()
    finally:
        producer.close()
    log.info("replayed %d events from %s to %s in %.1f s", sent, path, topic, time.monotonic() - start)
    return sent
