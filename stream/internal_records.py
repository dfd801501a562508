"""Validated decoding of the records of the workers' internal topics (`track-plays`, `track-vectors`,
`track-takedowns`). Workers write them, but anyone with access to the broker can too: every record is
checked before use, and a decoder never raises on bad input (it returns `(None, reason)`), so one bad
record is dead-lettered instead of crash-looping every worker that reads it."""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack
import numpy as np

from stream.events import MAX_ID_CHARS, id_problem

#: Largest internal record accepted (a track vector of MAX_FACTORS float32 plus ids, with room).
MAX_INTERNAL_BYTES = 16_384
#: Most factors a vector on an internal topic may have.
MAX_FACTORS = 1024
_LIMITS = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": 4 * MAX_ID_CHARS + 64,
    "max_bin_len": 4 * MAX_FACTORS,
    "max_array_len": 0,
    "max_map_len": 16,
    "max_ext_len": 0,
}


class TrackPlay(NamedTuple):
    """A listener's streams of a track the model does not know, with the listener's vector (or None)."""

    track: str
    user: str
    count: int
    x: bytes | None
    version: str | None = None  # model version `x` was solved against


class TrackVector(NamedTuple):
    """A folded-in track's vector, solved from `listeners` listeners against model `version`."""

    track: str
    vector: np.ndarray  # (k,) float32
    listeners: int
    version: str | None


class Takedown(NamedTuple):
    track: str
    taken_down: bool
    reason: str


def _map(value: Any) -> tuple[dict | None, str]:
    if not isinstance(value, bytes | bytearray | memoryview):
        return None, f"record value is {type(value).__name__}, not bytes"
    if len(value) > MAX_INTERNAL_BYTES:
        return None, f"payload of {len(value)} bytes exceeds {MAX_INTERNAL_BYTES}"
    try:
        body = msgpack.unpackb(value, **_LIMITS)
    except Exception as exc:  # msgpack raises several types
        return None, f"undecodable msgpack: {type(exc).__name__}: {str(exc)[:120]}"
    if not isinstance(body, dict):
        return None, f"payload is a msgpack {type(body).__name__}, not a map"
    return body, ""


def _id(body: dict, name: str) -> tuple[str | None, str]:
    value = body.get(name)
    if type(value) is not str:
        return None, f"field {name!r} is {type(value).__name__}, expected str"
    problem = id_problem(f"field {name!r}", value)
    return (None, problem) if problem else (value, "")


def _vector(value: Any, name: str) -> tuple[np.ndarray | None, str]:
    if not isinstance(value, bytes) or not value or len(value) % 4:
        return None, f"field {name!r} must be float32 little-endian bytes (a non-empty multiple of 4)"
    vector = np.frombuffer(value, "<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        return None, f"field {name!r} holds a NaN or infinite value"
    return vector, ""


def decode_track_play(value: Any) -> tuple[TrackPlay | None, str]:
    """`{"track", "user", "count": int >= 0, "x": float32 bytes | None[, "v": model version of x]}` or the
    reason it is not one."""
    body, reason = _map(value)
    if body is None:
        return None, reason
    track, reason = _id(body, "track")
    if track is None:
        return None, reason
    user, reason = _id(body, "user")
    if user is None:
        return None, reason
    count = body.get("count")
    if type(count) is not int or count < 0:
        return None, f"field 'count' must be an integer >= 0, got {count!r:.40}"
    x = body.get("x")
    if x is not None:
        _, reason = _vector(x, "x")
        if reason:
            return None, reason
    version = body.get("v")
    if version is not None and type(version) is not str:
        return None, f"field 'v' is {type(version).__name__}, expected str"
    return TrackPlay(track, user, count, x, version), ""


def decode_track_vector(value: Any) -> tuple[TrackVector | None, str]:
    """`{"track", "x": float32 bytes, "listeners": int >= 0, "version": str | None}` or the reason."""
    body, reason = _map(value)
    if body is None:
        return None, reason
    track, reason = _id(body, "track")
    if track is None:
        return None, reason
    vector, reason = _vector(body.get("x"), "x")
    if vector is None:
        return None, reason
    listeners = body.get("listeners", 0)
    if type(listeners) is not int or listeners < 0:
        return None, f"field 'listeners' must be an integer >= 0, got {listeners!r:.40}"
    version = body.get("version")
    if version is not None and type(version) is not str:
        return None, f"field 'version' is {type(version).__name__}, expected str"
    return TrackVector(track, vector, listeners, version), ""


def decode_takedown(value: Any) -> tuple[Takedown | None, str]:
    """`{"track", "taken_down": bool[, "reason": str]}` or the reason it is not one."""
    body, reason = _map(value)
    if body is None:
        return None, reason
    track, reason = _id(body, "track")
    if track is None:
        return None, reason
    down = body.get("taken_down")
    if type(down) is not bool:
        return None, f"field 'taken_down' is {type(down).__name__}, expected bool"
    why = body.get("reason", "")
    return Takedown(track, down, why if isinstance(why, str) else ""), ""
