"""Seeded hostile play payloads: every kind of bad input a public `plays` topic may carry.

`hostile_records(n, seed)` returns `n` (key, value, kind) triples, none of which is a valid play;
`exotic_valid(n)` returns valid plays whose ids are legal but unusual Unicode.
"""

from __future__ import annotations

import random
import struct
import time

import msgpack

NOW_MS = int(time.time() * 1000)
_GOOD = {"user": "x", "track": "t1", "ts": NOW_MS, "ms_played": 60_000}

#: msgpack headers that declare ~4 GiB of string, binary, array, map or extension data.
_BOMB_HEADERS = (b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9")
_NOT_AN_ID = (7, 2.5, True, None, b"raw", ["a"], {"a": 1}, "")
_NOT_AN_INT = (2.5, True, None, b"raw", ["a"], {"a": 1}, "", "9" * 20)
_BAD_UTF8 = (b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80")
_CONTROL = ("\x00", "\n", "\t", "\x1b[31m", "\x7f", "a\x00b")


def _play(**fields: object) -> bytes:
    return msgpack.packb({**_GOOD, **fields})


def _str_with_raw_bytes(raw: bytes) -> bytes:
    """A msgpack str header followed by bytes that are not valid UTF-8."""
    return (b"\xd9" + bytes([len(raw)]) + raw) if len(raw) < 256 else b"\xda" + struct.pack(">H", len(raw)) + raw


def hostile_value(rng: random.Random, kind: str, i: int) -> bytes:
    """One hostile payload of `kind`."""
    user = f"h{i}"
    if kind == "random-bytes":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    if kind == "bomb":
        return rng.choice(_BOMB_HEADERS) + b"\xff\xff\xff\xff" + bytes(rng.getrandbits(8) for _ in range(8))
    if kind == "nested":
        depth = rng.randint(200, 2000)
        if rng.random() < 0.5:
            return b"\x81\xa1a" * depth + b"\xc0"  # {"a": {"a": ... nil}}
        return b"\x91" * depth + b"\x01"  # [[[... 1]]]
    if kind == "wrong-type":
        field = rng.choice(("user", "track", "ts", "ms_played"))
        value = rng.choice(_NOT_AN_ID if field in ("user", "track") else _NOT_AN_INT)
        return _play(**{"user": user, field: value})
    if kind == "bad-utf8":
        packed = bytearray(_play(user=user, track="PLACEHOLDER"))
        start = packed.index(b"\xabPLACEHOLDER")
        return bytes(packed[:start]) + _str_with_raw_bytes(rng.choice(_BAD_UTF8)) + bytes(packed[start + 12 :])
    if kind == "control-chars":
        return _play(user=user, track="t" + rng.choice(_CONTROL))
    if kind == "future-ts":
        return _play(user=user, ts=rng.choice((NOW_MS + 10 * 86_400_000, 2**62, 2**64 - 1, -1, 0, 10**15)))
    if kind == "huge-string":
        return _play(user=user, track="x" * rng.randint(257, 10_000))
    if kind == "bad-ms-played":
        return _play(user=user, ms_played=rng.choice((-1, -(2**40), 10**10)))
    if kind == "not-a-map":
        return msgpack.packb(rng.choice(([1, 2, 3], "play", 42, None, 1.5)))
    if kind == "too-many-fields":
        return msgpack.packb({**_GOOD, "user": user, **{f"f{j}": j for j in range(40)}})
    if kind == "missing-field":
        body = {**_GOOD, "user": user}
        del body[rng.choice(("track", "ts", "ms_played"))]
        return msgpack.packb(body)
    if kind == "trailing-data":
        return _play(user=user) + b"\x00"
    raise ValueError(kind)


KINDS = (
    "random-bytes",
    "bomb",
    "nested",
    "wrong-type",
    "bad-utf8",
    "control-chars",
    "future-ts",
    "huge-string",
    "bad-ms-played",
    "not-a-map",
    "too-many-fields",
    "missing-field",
    "trailing-data",
    "key-mismatch",
)


def hostile_records(n: int, seed: int = 0) -> list[tuple[bytes | None, bytes, str]]:
    """`n` invalid records, the kinds in rotation; keys are the user id where one exists."""
    rng = random.Random(seed)
    out: list[tuple[bytes | None, bytes, str]] = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "key-mismatch":
            out.append((b"someone-else", _play(user=f"h{i}"), kind))
            continue
        out.append((f"h{i}".encode(), hostile_value(rng, kind, i), kind))
    return out


def exotic_valid(n: int) -> list[tuple[str, str]]:
    """(user, track) pairs with legal but unusual ids: scripts, emoji, joiners, RTL, combining marks."""
    users = ["Ünïcödé", "用户", "\U0001f3b5fan", "\u05de\u05e9\u05ea\u05de\u05e9", "e\u0301", "a\u200db", "x" * 256]
    tracks = ["曲", "\U0001f525\U0001f525", "\u0627\u063a\u0646\u064a\u0629", "Ω≈ç√", "t\u00a0t"]
    return [(users[i % len(users)], tracks[i % len(tracks)]) for i in range(n)]


#: The worker's internal topics (by suffix of their name) and what a valid record of each holds.
_INTERNAL_GOOD = {
    "track-plays": {"track": "nt1", "user": "x", "count": 2, "x": b"\x00\x00\x80\x3f" * 8},
    "track-vectors": {"track": "nt1", "x": b"\x00\x00\x80\x3f" * 8, "listeners": 5, "version": "v1"},
    "track-takedowns": {"track": "nt1", "taken_down": True, "reason": "", "at": NOW_MS},
}
INTERNAL_KINDS = ("random-bytes", "bomb", "not-a-map", "missing", "wrong-type", "bad-id", "bad-vector", "nan")


def hostile_internal(n: int, seed: int = 0) -> list[tuple[str, bytes, bytes, str]]:
    """`n` invalid records for the internal topics: (topic suffix, key, value, kind), topics and kinds in
    rotation (`plays.repartition` gets plays without or with a broken forwarding header)."""
    rng = random.Random(seed)
    topics = (*_INTERNAL_GOOD, "plays.repartition")
    out = []
    for i in range(n):
        topic, kind = topics[i % len(topics)], INTERNAL_KINDS[(i // len(topics)) % len(INTERNAL_KINDS)]
        key = f"h{i}".encode()
        if topic == "plays.repartition":
            out.append((topic, key, _play(user=f"h{i}"), "no-header" if (i // len(topics)) % 2 else "bad-header"))
            continue
        good = {**_INTERNAL_GOOD[topic]}
        if kind in ("random-bytes", "bomb", "not-a-map"):
            value = hostile_value(rng, kind, i)
        elif kind == "missing":  # a required field
            required = {"track-plays": ("track", "user", "count"), "track-vectors": ("track", "x")}
            del good[rng.choice(required.get(topic, ("track", "taken_down")))]
            value = msgpack.packb(good)
        elif kind == "wrong-type":
            field = rng.choice([f for f in good if f not in ("reason", "at", "version")])
            wrong = {"track": (7, b"raw", 2.5, True), "user": (7, b"raw", 2.5), "taken_down": ("yes", 1, None)}
            good[field] = rng.choice(wrong.get(field, ("3", -1, ["a"], 2.5)))
            value = msgpack.packb(good)
        elif kind == "bad-id":
            good["track"] = rng.choice(("", "x" * 300, "a\x00b", "\n"))
            value = msgpack.packb(good)
        elif kind == "bad-vector" and "x" in good:
            good["x"] = rng.choice((b"\x00\x00\x80", b"", "not bytes", 7))
            value = msgpack.packb(good)
        elif kind == "nan" and "x" in good:
            good["x"] = b"\x00\x00\xc0\x7f" * 8  # float32 NaN
            value = msgpack.packb(good)
        else:  # take-downs have no vector: an unknown state instead
            good["taken_down"] = rng.choice((1, 0, "true", None))
            value = msgpack.packb(good)
        out.append((topic, key, value, kind))
    return out
