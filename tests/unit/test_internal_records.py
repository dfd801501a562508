"""Decoders of the internal topics accept what workers write and reject every hostile record without
raising (tests/faults/hostile.py: the same records the real-broker test floods a worker with)."""

from __future__ import annotations

import numpy as np

from stream.codec import pack_message
from stream.internal_records import decode_takedown, decode_track_play, decode_track_vector

from ..faults.hostile import hostile_internal

DECODERS = {"track-plays": decode_track_play, "track-vectors": decode_track_vector, "track-takedowns": decode_takedown}


def test_what_workers_write_is_accepted():
    x = np.arange(8, dtype="<f4").tobytes()
    play, _ = decode_track_play(pack_message({"track": "n1", "user": "u", "count": 3, "x": x}))
    assert play is not None and (play.track, play.user, play.count, play.x) == ("n1", "u", 3, x)
    assert decode_track_play(pack_message({"track": "n1", "user": "u", "count": 1, "x": None}))[0].x is None
    solved, _ = decode_track_vector(pack_message({"track": "n1", "x": x, "listeners": 5, "version": "v"}))
    np.testing.assert_array_equal(solved.vector, np.arange(8, dtype=np.float32))
    down, _ = decode_takedown(pack_message({"track": "n1", "taken_down": False, "reason": "ok", "at": 1}))
    assert down is not None and down.taken_down is False


def test_every_hostile_record_is_rejected_with_a_reason():
    checked = 0
    for topic, _key, value, kind in hostile_internal(2000, seed=3):
        if topic in DECODERS:
            decoded, reason = DECODERS[topic](value)
            assert decoded is None and reason, (topic, kind, value[:60])
            checked += 1
    assert checked == 1500
