"""Byte formats of the stream's tables and internal topics (msgpack / JSON; never pickle)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import msgpack
import numpy as np

MODEL_UPDATES_TOPIC = "model-updates"
TRACK_PLAYS_TOPIC = "track-plays"
TRACK_VECTORS_TOPIC = "track-vectors"

_LIMITS = {"raw": False, "strict_map_key": False, "max_bin_len": 1 << 20, "max_str_len": 1 << 20}


class UserState(NamedTuple):
    """A user's streamed counts per track and their folded-in vector (with its model version)."""

    counts: dict[str, int]
    version: str | None = None
    vector: np.ndarray | None = None
    offset: int = -1  # offset of the last `plays` record applied (records of a user share a partition)


def pack_user(state: UserState) -> bytes:
    """One table value per user, so a batch writes one changelog record per changed user."""
    vector = None if state.vector is None else np.asarray(state.vector, dtype="<f4").tobytes()
    return msgpack.packb({"c": state.counts, "v": state.version, "x": vector, "o": state.offset})


def unpack_user(raw: bytes | None) -> UserState:
    if raw is None:
        return UserState({})
    body = msgpack.unpackb(raw, **_LIMITS)
    vector = None if body.get("x") is None else np.frombuffer(body["x"], dtype="<f4").astype(np.float32)
    return UserState(body["c"], body.get("v"), vector, int(body.get("o", -1)))


def pack_message(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body)


def unpack_message(raw: bytes) -> dict[str, Any]:
    return msgpack.unpackb(raw, **_LIMITS)


def model_update(version: str, store: str) -> bytes:
    """The announcement of a published model on topic `model-updates` (JSON, human-readable)."""
    return json.dumps({"version": version, "store": store}).encode("utf-8")


def parse_model_update(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw.decode("utf-8"))
    if not isinstance(body, dict) or not isinstance(body.get("version"), str):
        raise ValueError("a model update must be a JSON object with a string 'version'")
    return body
