"""Per-track state of a track the model does not know, bounded whatever its number of listeners.

The owner of a new track's `track-plays` partition keeps, in the `track-listeners` table:

* one small row per (track, listener): the listener's streams of the track, the vector the listener
  had when they last streamed or were re-solved, and the model version of that vector
  (`listener_key`, ~200 B at k = 40);
* one aggregate row per track (`stats_key`): the item half-step's sufficient statistics over the
  listeners whose vector belongs to the aggregate's model version,
  `A = sum_u (c_u - 1) x_u x_u^T` (k x k, float64, upper triangle stored) and `b = sum_u c_u x_u` (k),
  the number of such listeners, when the track was last solved and the offset of the last
  `track-plays` record they hold. 6.7 KB at k = 40, whatever the listeners (k <= 90 stays under 64 KiB).

A batch's aggregate rows are made durable before its listener rows, so a crash between the two
re-delivers records the aggregate already holds: those only set their listener row again (a record at
or below the aggregate's offset is never applied twice).

A listener's update replaces their old contribution by the new one (`-old + new`, exact in float64), so
a re-sent update changes nothing (idempotent) and a listener whose vector or count changed counts with
the new ones. The track's vector is `(X^T X + A + reg I)^-1 b`, the exact item half-step over its
listeners against the worker's X^T X (docs/STREAM.md). An aggregate of another model version (a swap)
starts again from zero: listeners count again as their re-folded vectors arrive.
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack
import numpy as np

from batch.als import AlsParams
from batch.confidence import confidence_minus_one

_LIMITS = {"raw": False, "strict_map_key": False, "max_bin_len": 1 << 24, "max_str_len": 1 << 16}


def confidence_weight(count: int, params: AlsParams) -> float:
    """`c - 1` of `count` streams, as the batch solver computes it (float32, then float64)."""
    weight = confidence_minus_one(np.array([count], np.float32), params.alpha, params.confidence, params.eps)
    return float(weight[0])


def listener_key(track: str, user: str) -> bytes:
    """Key of a (track, listener) row: ids have no control characters, so NUL separates them."""
    return b"L\x00" + track.encode() + b"\x00" + user.encode()


def stats_key(track: str) -> bytes:
    return b"T\x00" + track.encode()


class Listener(NamedTuple):
    count: int = 0
    x: bytes | None = None  # float32 LE, the vector the listener had (None: none yet)
    version: str | None = None  # model version of `x`


def pack_listener(listener: Listener) -> bytes:
    return msgpack.packb({"c": listener.count, "x": listener.x, "v": listener.version})


def unpack_listener(raw: bytes | None) -> Listener:
    """A listener row (an empty one for None or a damaged row: the next update sets it again)."""
    if raw is None:
        return Listener()
    try:
        body = msgpack.unpackb(raw, **_LIMITS)
        count, x, version = int(body["c"]), body.get("x"), body.get("v")
        if (x is not None and not isinstance(x, bytes)) or (version is not None and not isinstance(version, str)):
            return Listener()
        return Listener(count, x, version)
    except Exception:
        return Listener()


class TrackStats:
    """The sufficient statistics of one track's item half-step for model `version` (k factors)."""

    __slots__ = ("A", "b", "k", "listeners", "offset", "solved_at", "version")

    def __init__(self, version: str | None, k: int) -> None:
        self.version, self.k = version, k
        self.A = np.zeros((k, k), np.float64)
        self.b = np.zeros(k, np.float64)
        self.listeners = 0  # listeners with a vector of `version` and at least one stream
        self.solved_at = 0  # `listeners` when the track was last solved (0: never for this version)
        #: offset of the last `track-plays` record applied (a track's records share one partition), so a
        #: record re-delivered after a crash is applied once (-1: none yet)
        self.offset = -1

    def apply(self, x: bytes | None, version: str | None, weight: float, sign: float) -> bool:
        """Add (sign +1) or remove (-1) one listener's contribution: x float32 bytes, weight = c - 1."""
        if x is None or version != self.version:
            return False
        v = np.frombuffer(x, "<f4").astype(np.float64)
        if len(v) != self.k:
            return False
        self.A += sign * weight * np.outer(v, v)
        self.b += sign * (1.0 + weight) * v
        self.listeners += int(sign)
        return True

    def solve(self, gram: np.ndarray, reg: float) -> np.ndarray:
        """(k,) float32: the exact item half-step `(X^T X + A + reg I)^-1 b`."""
        system = np.asarray(gram, np.float64) + self.A + reg * np.eye(self.k)
        return np.linalg.solve(system, self.b).astype(np.float32)


def pack_stats(stats: TrackStats) -> bytes:
    upper = stats.A[np.triu_indices(stats.k)]
    return msgpack.packb(
        {
            "v": stats.version,
            "k": stats.k,
            "A": upper.astype("<f8").tobytes(),
            "b": stats.b.astype("<f8").tobytes(),
            "n": stats.listeners,
            "s": stats.solved_at,
            "o": stats.offset,
        }
    )


def unpack_stats(raw: bytes | None, version: str | None, k: int) -> TrackStats:
    """The track's statistics for model `version`: a row of another version or k, a damaged row or none
    gives empty statistics (the listeners count again as their vectors of this version arrive)."""
    fresh = TrackStats(version, k)
    if raw is None:
        return fresh
    try:
        body = msgpack.unpackb(raw, **_LIMITS)
        if body["v"] != version or body["k"] != k:
            return fresh
        rows, cols = np.triu_indices(k)
        A = np.zeros((k, k), np.float64)
        A[rows, cols] = np.frombuffer(body["A"], "<f8")
        A[cols, rows] = A[rows, cols]
        fresh.A, fresh.b = A, np.frombuffer(body["b"], "<f8").astype(np.float64)
        fresh.listeners, fresh.solved_at = int(body["n"]), int(body["s"])
        fresh.offset = int(body.get("o", -1))
        if fresh.b.shape != (k,):
            return TrackStats(version, k)
    except Exception:
        return TrackStats(version, k)
    return fresh
