"""Play-event decoding: every malformed record yields a reason, never an exception."""

import msgpack
import pytest

from stream.events import MAX_PAYLOAD_BYTES, EventError, PlayEvent, decode_play, encode_play

NOW = 1_764_000_000_000


def pack(**fields):
    body = {"user": "u1", "track": "t1", "ts": NOW, "ms_played": 45_000}
    body.update(fields)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...})


def test_valid_event_round_trip():
    key, value = encode_play("ü-1", "t/2", NOW, 31_000, event_id="e-9")
    event, reason = decode_play(key, value, NOW)
    assert reason == "" and event == PlayEvent("ü-1", "t/2", NOW, 31_000, "e-9")
    assert key == "ü-1".encode()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"u1", None, "empty record value"),
        (b"u1", b"\xc1", "undecodable msgpack"),
        (b"u1", pack()[:-3], "undecodable msgpack"),
        (b"u1", msgpack.packb([1, 2]), "not a map"),
        (b"u1", pack(track=...), "missing field 'track'"),
        (b"u1", pack(ts="yesterday"), "field 'ts' is str"),
        (b"u1", pack(ms_played=True), "field 'ms_played' is bool"),
        (b"u1", pack(ms_played=1.5), "field 'ms_played' is float"),
        (b"u1", pack(ms_played=-1), "negative ms_played"),
        (b"u1", pack(ms_played=10**12), "exceeds one day"),
        (b"u1", pack(ts=NOW + 10**10), "outside"),
        (b"u1", pack(ts=0), "outside"),
        (b"u1", pack(track=""), "1 to 256 characters"),
        (b"u1", pack(track="x" * 300), "1 to 256 characters"),
        (b"u1", pack(event_id=7), "event_id"),
        (b"someone-else", pack(), "does not match the user"),
        (b"u1", b"\x00" * (MAX_PAYLOAD_BYTES + 1), "exceeds"),
        (b"u1", b"\xdb\xff\xff\xff\xff", "undecodable msgpack"),  # str32 declaring 4 GiB
        (b"u1", b"\xdf\xff\xff\xff\xff", "undecodable msgpack"),  # map32 declaring 4G entries
        (b"u1", b"\x91" * 3000 + b"\x00", "undecodable msgpack"),  # deeply nested arrays
        (b"u1", msgpack.packb({1: "int key"}), "undecodable msgpack"),
        (b"u1", b"\xa3\xff\xfe\xfd", "undecodable msgpack"),  # invalid UTF-8 in a str
    ],
)
def test_invalid_events_have_reasons(key, value, reason):
    event, why = decode_play(key, value, NOW)
    assert event is None and reason in why


def test_missing_key_is_accepted_and_extra_fields_ignored():
    event, reason = decode_play(None, pack(client="web"), NOW)
    assert reason == "" and event.user == "u1"


def test_encode_refuses_invalid_events():
    with pytest.raises(EventError, match="negative"):
        encode_play("u", "t", NOW, -5)


def test_hostile_payloads_are_rejected_with_reasons_in_bounded_memory():
    """10K fuzzed payloads (tests/faults/hostile.py): each has a reason, none raises, and decoding
    them allocates no more than a small constant (no payload's declared length is ever allocated)."""
    import time
    import tracemalloc

    from tests.faults.hostile import KINDS, hostile_records

    now = int(time.time() * 1000)
    records = hostile_records(10_000, seed=3)
    tracemalloc.start()
    try:
        reasons = {}
        for key, value, kind in records:
            event, reason = decode_play(key, value, now)
            assert event is None, (kind, value[:80])
            assert reason, kind
            reasons.setdefault(kind, reason)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert set(reasons) == set(KINDS)
    assert peak < 256 * 1024, f"decoding hostile payloads peaked at {peak} bytes"
    assert "control character" in reasons["control-chars"]
    assert "timestamp" in reasons["future-ts"]


def test_unusual_but_legal_unicode_ids_are_valid():
    from tests.faults.hostile import exotic_valid

    for user, track in exotic_valid(12):
        event, reason = decode_play(*encode_play(user, track, NOW, 60_000), NOW)
        assert reason == "" and (event.user, event.track) == (user, track)
