"""A tiny faust worker for the ingest tests and benchmark (``stream/ingest.py``).

Run: ``python tests/integration/ingest_worker.py worker -l info`` with the environment:

``INGEST_BOOTSTRAP`` (host:port), ``INGEST_TOPIC``, ``INGEST_APP_ID``, ``INGEST_DATA_DIR``,
``INGEST_WEB_PORT``, ``INGEST_MODE`` (``ingest``: BatchIngest + table; ``ingest-notable``:
BatchIngest, counts in a local dict only; ``take``: plain ``stream.take`` agent, local dict),
``INGEST_PARTITIONS`` (8), ``INGEST_MAX_BATCH`` (10000), ``INGEST_MAX_LATENCY`` (0.05),
``INGEST_SESSION_TIMEOUT`` (60 s), ``INGEST_DEBUG`` (log every batch).

The table ``counts`` maps user -> ``{"o": last applied source offset, "p": source partition,
"c": {track: plays}}``; the offset makes re-delivered records (at-least-once) idempotent.  HTTP on 127.0.0.1:

* ``GET /status/`` -> events, batches, assigned plays partitions, recovery state, rows, elapsed.
* ``GET /dump/`` -> ``{user: {track: count}}`` for the table partitions this worker owns now.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import faust
import msgpack

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stream.ingest import BatchIngest, source_partition  # noqa: E402

log = logging.getLogger("playrec.ingest_worker")

BOOTSTRAP = os.environ.get("INGEST_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = os.environ.get("INGEST_TOPIC", "plays")
APP_ID = os.environ.get("INGEST_APP_ID", "playrec-ingest-test")
DATA_DIR = os.environ.get("INGEST_DATA_DIR", "/tmp/playrec-ingest-worker")
WEB_PORT = int(os.environ.get("INGEST_WEB_PORT", "6066"))
MODE = os.environ.get("INGEST_MODE", "ingest")
PARTITIONS = int(os.environ.get("INGEST_PARTITIONS", "8"))
MAX_BATCH = int(os.environ.get("INGEST_MAX_BATCH", "10000"))
MAX_LATENCY = float(os.environ.get("INGEST_MAX_LATENCY", "0.05"))
SESSION_TIMEOUT = float(os.environ.get("INGEST_SESSION_TIMEOUT", "60"))
if os.environ.get("INGEST_DEBUG"):
    logging.getLogger("playrec").setLevel(logging.DEBUG)

UNPACK = {
    "raw": False,
    "max_str_len": 4096,
    "max_bin_len": 0,
    "max_array_len": 16,
    "max_map_len": 16,
    "max_ext_len": 0,
}

app = faust.App(
    APP_ID,
    broker=f"kafka://{BOOTSTRAP}",
    datadir=DATA_DIR,
    store="memory://",
    topic_partitions=PARTITIONS,
    web_host="127.0.0.1",
    web_bind="127.0.0.1",
    web_port=WEB_PORT,
    broker_commit_every=50_000,
    broker_session_timeout=SESSION_TIMEOUT,
    broker_heartbeat_interval=min(3.0, SESSION_TIMEOUT / 5),
)
# Keys are JSON on the changelog (faust's default for key_type=str: b'"u1"', not b'u1'), so a
# producer-side partitioner (use_partitioner=True) would hash different bytes than the plays
# producer did; handle_batch pins every write to its source partition instead.
# value_type must stay unset (json -> dict): value_type=dict breaks recovery (dict.from_data).
counts = app.Table("counts", default=None, partitions=PARTITIONS, key_type=str)

stats: dict[str, Any] = {"events": 0, "batches": 0, "first_at": None, "last_at": None, "bad": 0}
local_counts: dict[tuple[str, str], int] = {}


def _note(n: int) -> None:
    now = time.time()
    if stats["first_at"] is None:
        stats["first_at"] = now
    stats["last_at"] = now
    stats["events"] += n
    stats["batches"] += 1


async def handle_batch(batch: list[Any]) -> None:
    """Decode, aggregate per user within the batch, write one table row per touched user."""
    unpackb = msgpack.unpackb
    rows: dict[str, list[Any]] = {}  # user -> [row, last message applied]
    for m in batch:
        try:
            ev = unpackb(m.value, **UNPACK)
            user, track = ev["user"], ev["track"]
        except Exception:  # the real worker sends these to plays.dead-letter
            stats["bad"] += 1
            continue
        entry = rows.get(user)
        if entry is None:
            old = counts.get(user)
            row = {"o": old["o"] if old else -1, "p": m.partition, "c": dict(old["c"]) if old else {}}
            entry = rows[user] = [row, None]
        row = entry[0]
        if m.offset <= row["o"]:
            continue  # re-delivery of a record already in the table
        c = row["c"]
        c[track] = c.get(track, 0) + 1
        row["o"] = m.offset
        entry[1] = m
    for user, (row, m) in rows.items():
        if m is not None:
            with source_partition(app, m):
                counts[user] = row
    _note(len(batch))


async def handle_batch_notable(batch: list[Any]) -> None:
    unpackb = msgpack.unpackb
    for m in batch:
        ev = unpackb(m.value, **UNPACK)
        key = (ev["user"], ev["track"])
        local_counts[key] = local_counts.get(key, 0) + 1
    _note(len(batch))


if MODE == "ingest":
    ingest = BatchIngest(app, TOPIC, handle_batch, max_batch=MAX_BATCH, max_latency_s=MAX_LATENCY)
elif MODE == "ingest-notable":
    ingest = BatchIngest(app, TOPIC, handle_batch_notable, max_batch=MAX_BATCH, max_latency_s=MAX_LATENCY)
elif MODE == "take":
    plays = app.topic(TOPIC, key_serializer="raw", value_serializer="raw")

    @app.agent(plays)
    async def take_agent(stream: Any) -> None:
        unpackb = msgpack.unpackb
        async for values in stream.take(MAX_BATCH, within=MAX_LATENCY):
            for value in values:
                ev = unpackb(value, **UNPACK)
                key = (ev["user"], ev["track"])
                local_counts[key] = local_counts.get(key, 0) + 1
            _note(len(values))
else:
    raise SystemExit(f"unknown INGEST_MODE {MODE!r}")


def _assigned() -> list[int]:
    try:
        return sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == TOPIC)
    except Exception:
        return []


@app.page("/status/")
async def status(web: Any, request: Any) -> Any:
    recovery = app.tables.recovery
    return web.json(
        {
            **stats,
            "mode": MODE,
            "pid": os.getpid(),
            "assigned": _assigned(),
            "rebalancing": bool(app.rebalancing),
            "in_recovery": bool(recovery.in_recovery),
            "recovered": bool(recovery.completed.is_set()),
            "rows": len(counts),
            "pairs": len(local_counts),
        }
    )


@app.page("/dump/")
async def dump(web: Any, request: Any) -> Any:
    # faust's memory store keeps the rows of revoked partitions: report only owned partitions
    owned = set(_assigned())
    return web.json({user: row["c"] for user, row in counts.items() if row["p"] in owned})


if __name__ == "__main__":
    from stream.diagnostics import install_dump_on_signal

    install_dump_on_signal(app)
    app.main()
