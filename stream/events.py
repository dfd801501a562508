"""Play events on the wire (DESIGN.md section 3): msgpack maps on topic `plays`, keyed by user id.

`decode_play` validates one Kafka record with hard size limits and returns either a `PlayEvent` or
the reason it is invalid; invalid records go to `plays.dead-letter` with their original bytes.
`encode_play` is the producer side used by `playrec replay` and the tests.
"""

from __future__ import annotations

import re
import time
from typing import NamedTuple

import msgpack

PLAYS_TOPIC = "plays"
DEAD_LETTER_TOPIC = "plays.dead-letter"
#: Plays produced to another partition than their user's, forwarded there (stream/repartition.py).
REPARTITION_TOPIC = "plays.repartition"

#: Largest accepted record value; a play event is well under 200 bytes.
MAX_PAYLOAD_BYTES = 4096
#: Longest user / track / event id, in characters.
MAX_ID_CHARS = 256
#: Largest map accepted by the decoder (four fields, the optional event id, room for additions).
MAX_MAP_LEN = 16
#: Timestamps before 2000-01-01 or more than a day ahead of the worker's clock are absurd.
MIN_TS_MS = 946_684_800_000
MAX_FUTURE_MS = 86_400_000
#: A single play longer than a day is not a play.
MAX_MS_PLAYED = 86_400_000

_UNPACK_LIMITS = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": MAX_PAYLOAD_BYTES,
    "max_bin_len": 0,
    "max_array_len": MAX_MAP_LEN,
    "max_map_len": MAX_MAP_LEN,
    "max_ext_len": 0,
}
#: Control characters (C0, DEL, C1) and Unicode line/paragraph separators: they would corrupt logs,
#: tab-separated exports and numpy's unicode arrays (which drop trailing NULs) if they reached an id.
_FORBIDDEN_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_REQUIRED = (("user", str), ("track", str), ("ts", int), ("ms_played", int))


class PlayEvent(NamedTuple):
    """A valid play: ids as sent, `ts` in ms since the epoch, `ms_played` in ms."""

    user: str
    track: str
    ts: int
    ms_played: int
    event_id: str | None = None


class EventError(ValueError):
    """An event that cannot be encoded."""


def id_problem(what: str, text: str) -> str:
    """Why `text` is not a valid user or track id ("" when it is): 1 to 256 characters, no controls."""
    if not text or len(text) > MAX_ID_CHARS:
        return f"{what} must have 1 to {MAX_ID_CHARS} characters, has {len(text)}"
    bad = _FORBIDDEN_ID_CHARS.search(text)
    if bad is not None:
        return f"{what} contains the control character U+{ord(bad.group()):04X} at {bad.start()}"
    return ""


def decode_play(key: bytes | None, value: bytes | None, now_ms: int | None = None) -> tuple[PlayEvent | None, str]:
    """Validate one record: returns `(event, "")` or `(None, reason)`; never raises on bad input."""
    if value is None:
        return None, "empty record value"
    if not isinstance(value, bytes | bytearray | memoryview):
        return None, f"record value is {type(value).__name__}, not bytes"
    if len(value) > MAX_PAYLOAD_BYTES:
        return None, f"payload of {len(value)} bytes exceeds {MAX_PAYLOAD_BYTES}"
    try:
        data = msgpack.unpackb(value, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        return None, f"undecodable msgpack: {type(exc).__name__}: {str(exc)[:120]}"
    if not isinstance(data, dict):
        return None, f"payload is a msgpack {type(data).__name__}, not a map"
    for name, kind in _REQUIRED:
        field = data.get(name)
        if field is None:
            return None, f"missing field {name!r}"
        if type(field) is not kind:  # bool is an int subclass: rejected on purpose
            return None, f"field {name!r} is {type(field).__name__}, expected {kind.__name__}"
    user, track, ts, ms_played = data["user"], data["track"], data["ts"], data["ms_played"]
    for name, text in (("user", user), ("track", track)):
        problem = id_problem(f"field {name!r}", text)
        if problem:
            return None, problem
    event_id = data.get("event_id")
    if event_id is not None and (type(event_id) is not str or not 0 < len(event_id) <= MAX_ID_CHARS):
        return None, "field 'event_id' must be a non-empty string of at most 256 characters"
    if ms_played < 0:
        return None, f"negative ms_played {ms_played}"
    if ms_played > MAX_MS_PLAYED:
        return None, f"ms_played {ms_played} exceeds one day"
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if ts < MIN_TS_MS or ts > now + MAX_FUTURE_MS:
        return None, f"timestamp {ts} ms is outside [2000-01-01, now + 1 day]"
    if key is not None and key != user.encode("utf-8"):
        return None, "record key does not match the user id (events must be keyed by user)"
    return PlayEvent(user, track, ts, ms_played, event_id), ""


def encode_play(user: str, track: str, ts: int, ms_played: int, event_id: str | None = None) -> tuple[bytes, bytes]:
    """`(key, value)` of a play record: key = user id UTF-8, value = msgpack map."""
    body: dict[str, object] = {"user": user, "track": track, "ts": int(ts), "ms_played": int(ms_played)}
    if event_id is not None:
        body["event_id"] = event_id
    event, reason = decode_play(None, msgpack.packb(body), now_ms=int(ts))
    if event is None:
        raise EventError(f"invalid play event: {reason}")
    return user.encode("utf-8"), msgpack.packb(body)
