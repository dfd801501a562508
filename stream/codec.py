"""Byte formats of the stream's tables and internal topics (msgpack / JSON; never pickle)."""

from __future__ import annotations

import json
from typing import Any

import msgpack

MODEL_UPDATES_TOPIC = "model-updates"
TRACK_PLAYS_TOPIC = "track-plays"
TRACK_VECTORS_TOPIC = "track-vectors"
TRACK_TAKEDOWNS_TOPIC = "track-takedowns"
#: restores of user-state changelog partitions from their source topics (stream/source_replay.py)
REPAIRS_TOPIC = "user-state-repairs"

_LIMITS = {"raw": False, "strict_map_key": False, "max_bin_len": 1 << 20, "max_str_len": 1 << 20}


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
