"""Where a worker keeps its local table state, and which Kafka cluster that state belongs to.

The local state (faust's RocksDB tables) is a cache of the tables' changelog topics. A copy made against
another cluster (a fresh development broker, a migration) or against changelog topics since deleted and
recreated can look valid offset by offset and still hold rows the changelog never had. So the data
directory records the cluster id and the changelog topics' ids (`playrec-state.json`); when a worker
starts against a cluster or changelog topics other than the recorded ones, it starts the directory
clean (one warning) and restores from the changelog. Offsets are checked per partition on assignment
(stream.table_store).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The file in a worker's data directory naming the cluster and changelog topics its state came from.
IDENTITY_FILE = "playrec-state.json"


def default_data_dir(app_id: str, port: int) -> Path:
    """`$XDG_STATE_HOME/playrec/<app id>-<port>` (default `~/.local/state/...`): one directory per worker
    of an app on a host, outside whatever directory the worker was started in."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "playrec" / f"{app_id}-{port}"


def cluster_identity(bootstrap: str, changelogs: list[str], client_kwargs: dict[str, Any]) -> dict[str, Any]:
    """{"cluster_id": str, "changelogs": {topic: topic id}} as the broker reports them now."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="playrec-local-state", **client_kwargs)
    try:
        cluster_id = admin.describe_cluster().get("cluster_id")
        ids = {
            t.get("name", t.get("topic")): str(t.get("topic_id") or "")
            for t in admin.describe_topics(changelogs)
            if not t.get("error_code")
        }
    finally:
        admin.close()
    return {"cluster_id": str(cluster_id or ""), "changelogs": {name: ids.get(name, "") for name in changelogs}}


def identity_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between the recorded identity of a data directory and the cluster's, or None."""
    if recorded.get("cluster_id") != current["cluster_id"]:
        return f"it was written for Kafka cluster {recorded.get('cluster_id')!r}, this is {current['cluster_id']!r}"
    before = recorded.get("changelogs") or {}
    for topic, topic_id in current["changelogs"].items():
        if topic in before and before[topic] != topic_id:
            return f"changelog topic {topic} was recreated (topic id {before[topic]} -> {topic_id})"
    return None


def bind_local_state(data_dir: Path, current: dict[str, Any]) -> bool:
    """Make `data_dir` belong to the cluster `current` (see `cluster_identity`): empty it when it holds
    state of another cluster or of changelog topics since recreated, then record `current`. True when
    the directory was emptied."""
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / IDENTITY_FILE
    wiped = False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        recorded = None
    except (OSError, ValueError) as exc:
        recorded = {"cluster_id": f"unreadable ({exc})"}
    reason = identity_mismatch(recorded, current) if recorded is not None else None
    if reason is not None:
        log.warning("local state in %s started clean: %s; the tables restore from their changelogs", data_dir, reason)
        for entry in data_dir.iterdir():
            if entry.name != IDENTITY_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        wiped = True
    if recorded != current:
        temporary = marker.with_suffix(".tmp")
        temporary.write_text(json.dumps(current, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temporary, marker)
    return wiped
