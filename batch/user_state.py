"""The stream's per-user state row (table `user-state`), shared by the workers that write it and the
batch snapshot that trains on it: msgpack `{"c": {track: streams}, "v": version, "x": float32 LE bytes,
"o": last applied plays offset[, "e": 8-byte digests of the event ids of the user's latest applied plays]
[, "s": {source partition: last applied offset} of plays forwarded from other partitions]}`."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import msgpack
import numpy as np

USER_STATE_TABLE = "user-state"
_LIMITS = {"raw": False, "strict_map_key": False, "max_bin_len": 1 << 20, "max_str_len": 1 << 20}


class UserStateError(ValueError):
    """A user-state record that is not one (damaged, or written by something else)."""


class UserState(NamedTuple):
    """A user's streamed counts per track and their folded-in vector (with its model version)."""

    counts: dict[str, int]
    version: str | None = None
    vector: np.ndarray | None = None
    offset: int = -1  # offset of the last record applied from the user's own `plays` partition
    recent: bytes = b""  # `event_digest`s of the latest applied plays that had an event id, oldest first
    #: plays produced to another `plays` partition and forwarded to the user's: source partition -> offset
    #: of the last one applied (a forwarder re-sends a suffix of a partition after a crash: skipped)
    sources: dict[int, int] | None = None

    def stamp(self) -> int:
        """A number that grows whenever any applied offset grows (the state's version for caches)."""
        total = self.offset + 1  # every term is >= 0 and never shrinks, so the sum grows with any of them
        if self.sources:
            total += sum(self.sources.values()) + len(self.sources)
        return total


#: Bytes of an event id's digest in `UserState.recent`.
EVENT_DIGEST_BYTES = 8


def event_digest(event_id: str) -> bytes:
    """The 8-byte BLAKE2b digest of an event id that a user's row remembers (fixed size, one bytes field:
    cheap to encode; two different ids of one user's latest plays collide with probability ~2^-58)."""
    return hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=EVENT_DIGEST_BYTES).digest()


def has_digest(recent: bytes, digest: bytes) -> bool:
    """Whether `digest` is one of the digests concatenated in `recent` (aligned matches only)."""
    i = recent.find(digest)
    while i != -1 and i % EVENT_DIGEST_BYTES:
        i = recent.find(digest, i + 1)
    return i != -1


def changelog_topic(app_id: str, table: str = USER_STATE_TABLE) -> str:
    """faust's changelog topic of `table` (the user-state table by default) of app `app_id`."""
    return f"{app_id}-{table}-changelog"


def pack_user(state: UserState) -> bytes:
    """One table value per user, so a batch writes one changelog record per changed user."""
    vector = None if state.vector is None else np.asarray(state.vector, dtype="<f4").tobytes()
    body = {"c": state.counts, "v": state.version, "x": vector, "o": state.offset}
    if state.recent:
        body["e"] = state.recent
    if state.sources:
        body["s"] = state.sources
    return msgpack.packb(body)


def unpack_user(raw: bytes | None) -> UserState:
    """Decode a row (None = no row); raises `UserStateError` for anything that is not a row."""
    if raw is None:
        return UserState({})
    try:
        body = msgpack.unpackb(raw, **_LIMITS)
        counts = body["c"]
        vector = None if body.get("x") is None else np.frombuffer(body["x"], dtype="<f4").astype(np.float32)
        sources = body.get("s")
        if sources is not None:
            sources = {int(p): int(o) for p, o in sources.items()}
        state = UserState(counts, body.get("v"), vector, int(body.get("o", -1)), body.get("e", b""), sources)
    except Exception as exc:
        raise UserStateError(f"not a user-state record: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(state.recent, bytes) or len(state.recent) % EVENT_DIGEST_BYTES:
        raise UserStateError(
            f"not a user-state record: recent event ids must be {EVENT_DIGEST_BYTES}-byte digests in one bytes field"
        )
    if not isinstance(counts, dict) or not all(
        isinstance(t, str) and type(c) is int and c >= 0 for t, c in counts.items()
    ):
        raise UserStateError("not a user-state record: counts must map track ids to non-negative integers")
    return state
