"""The stream's per-user row (batch.user_state): what workers write and the retrain snapshot reads."""

import msgpack
import numpy as np
import pytest

from batch.user_state import UserState, UserStateError, event_digest, has_digest, pack_user, unpack_user


def test_round_trip_with_vector_and_event_ids():
    recent = event_digest("e1") + event_digest("e2")
    state = UserState({"t1": 3, "t2": 1}, "v7", np.arange(4, dtype=np.float32), 41, recent)
    back = unpack_user(pack_user(state))
    assert (back.counts, back.version, back.offset, back.recent) == ({"t1": 3, "t2": 1}, "v7", 41, recent)
    np.testing.assert_array_equal(back.vector, state.vector)
    assert back.vector.dtype == np.float32


def test_rows_without_event_ids_stay_as_before():
    """Plays without event ids leave no "e" field, and rows written before it existed read as no ids."""
    state = UserState({"t1": 1}, None, None, 5)
    assert set(msgpack.unpackb(pack_user(state))) == {"c", "v", "x", "o"}
    old = msgpack.packb({"c": {"t1": 1}, "v": None, "x": None, "o": 5})
    assert unpack_user(old) == state
    assert unpack_user(None) == UserState({})


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1not msgpack",
        msgpack.packb([1, 2]),
        msgpack.packb({"c": {"t1": -1}}),
        msgpack.packb({"c": {"t1": 1.5}}),
        msgpack.packb({"c": {"t1": 1}, "e": ["e1"]}),
        msgpack.packb({"c": {"t1": 1}, "e": b"1234567"}),  # not whole digests
    ],
)
def test_damaged_rows_raise_a_specific_error(raw):
    with pytest.raises(UserStateError, match="not a user-state record"):
        unpack_user(raw)


def test_event_digests_match_only_whole_aligned_digests():
    a, b = event_digest("play-1"), event_digest("play-2")
    assert len(a) == 8 and a != b and event_digest("play-1") == a  # stable across processes (no hash seed)
    assert has_digest(a + b, a) and has_digest(a + b, b)
    assert not has_digest(a + b, event_digest("play-3"))
    assert not has_digest(a + b, a[4:] + b[:4])  # straddling two digests is not a match
    assert not has_digest(b"", a)
