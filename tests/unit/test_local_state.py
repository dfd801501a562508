"""Local table state: which partitions' local stores the changelog still backs, and the cluster binding
of a worker's data directory."""

from __future__ import annotations

import json

import pytest

from stream.local_state import IDENTITY_FILE, bind_local_state, default_data_dir, identity_mismatch
from stream.settings import WorkerSettings
from stream.table_store import stale_reason

IDENTITY = {"cluster_id": "c1", "changelogs": {"app-user-state-changelog": "id-1", "app-l-changelog": "id-2"}}


@pytest.mark.parametrize(
    ("persisted", "has_rows", "earliest", "end"),
    [
        (None, False, 0, 0),  # nothing local, empty changelog
        (None, False, 0, 100),  # nothing local yet
        (99, True, 0, 100),  # everything read
        (49, True, 0, 100),  # a prefix: resume from 50
        (-1, False, 0, 100),
        (9, True, 10, 100),  # truncated up to exactly what is local
    ],
)
def test_a_prefix_of_the_changelog_is_resumed(persisted, has_rows, earliest, end):
    assert stale_reason(persisted, has_rows, earliest, end) is None


@pytest.mark.parametrize(
    ("persisted", "has_rows", "earliest", "end", "words"),
    [
        (4999, True, 0, 300, "past the changelog's last offset 299"),  # a new broker
        (100, True, 0, 100, "past"),
        (99, True, 100, 100, "empty"),  # retention emptied it
        (5, True, 0, 0, "empty"),  # recreated topic
        (3, True, 10, 100, "before the changelog's first offset 10"),  # truncated past the local copy
        (None, True, 0, 100, "no changelog offset"),  # rows written without their offset
    ],
)
def test_a_store_the_changelog_does_not_back_is_stale(persisted, has_rows, earliest, end, words):
    reason = stale_reason(persisted, has_rows, earliest, end)
    assert reason is not None and words in reason


def test_identity_mismatches():
    assert identity_mismatch(IDENTITY, IDENTITY) is None
    other_cluster = {**IDENTITY, "cluster_id": "c2"}
    assert "cluster" in identity_mismatch(IDENTITY, other_cluster)
    recreated = {"cluster_id": "c1", "changelogs": {**IDENTITY["changelogs"], "app-l-changelog": "id-9"}}
    assert "recreated" in identity_mismatch(IDENTITY, recreated)
    new_table = {"cluster_id": "c1", "changelogs": {**IDENTITY["changelogs"], "app-new-changelog": "id-3"}}
    assert identity_mismatch(IDENTITY, new_table) is None  # a table added since is no mismatch


def _fill(data_dir):
    tables = data_dir / "v1" / "tables" / "user-state-0.db"
    tables.mkdir(parents=True)
    (tables / "CURRENT").write_text("x")
    (data_dir / "loose-file").write_text("y")


def test_bind_records_and_keeps_state_of_the_same_cluster(tmp_path):
    data_dir = tmp_path / "state"
    assert bind_local_state(data_dir, IDENTITY) is False
    assert json.loads((data_dir / IDENTITY_FILE).read_text()) == IDENTITY
    _fill(data_dir)
    assert bind_local_state(data_dir, IDENTITY) is False
    assert (data_dir / "v1" / "tables" / "user-state-0.db" / "CURRENT").is_file()


@pytest.mark.parametrize(
    "current",
    [
        {**IDENTITY, "cluster_id": "new-broker"},
        {"cluster_id": "c1", "changelogs": {**IDENTITY["changelogs"], "app-user-state-changelog": "id-7"}},
    ],
)
def test_bind_starts_clean_for_another_cluster_or_recreated_topics(tmp_path, current, caplog):
    data_dir = tmp_path / "state"
    bind_local_state(data_dir, IDENTITY)
    _fill(data_dir)
    assert bind_local_state(data_dir, current) is True
    assert sorted(p.name for p in data_dir.iterdir()) == [IDENTITY_FILE]
    assert json.loads((data_dir / IDENTITY_FILE).read_text()) == current
    assert "started clean" in caplog.text


def test_bind_starts_clean_when_the_identity_file_is_damaged(tmp_path):
    data_dir = tmp_path / "state"
    _fill(data_dir)
    (data_dir / IDENTITY_FILE).write_text("{not json")
    assert bind_local_state(data_dir, IDENTITY) is True
    assert sorted(p.name for p in data_dir.iterdir()) == [IDENTITY_FILE]


def test_a_data_dir_from_before_the_identity_file_is_kept(tmp_path):
    """Without a recorded identity nothing proves the state stale: it is kept (the per-partition offset
    checks still guard it) and the identity is recorded."""
    data_dir = tmp_path / "state"
    _fill(data_dir)
    assert bind_local_state(data_dir, IDENTITY) is False
    assert (data_dir / "loose-file").is_file()
    assert (data_dir / IDENTITY_FILE).is_file()


def test_default_data_dir_is_per_app_and_port_under_the_state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_data_dir("playrec", 6066) == tmp_path / "playrec" / "playrec-6066"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert ".local/state/playrec/playrec-6066" in str(default_data_dir("playrec", 6066))
    settings = WorkerSettings(bootstrap="b:1", store=tmp_path, app_id="a", port=7000)
    assert settings.state_dir == default_data_dir("a", 7000)
    assert WorkerSettings(bootstrap="b:1", store=tmp_path, data_dir=tmp_path / "d").state_dir == tmp_path / "d"
