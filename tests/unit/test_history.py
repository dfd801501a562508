"""One history (batch.history): a retrain's input is history + snapshot, each play counted once."""

from __future__ import annotations

import numpy as np
import pytest

from batch.als import AlsParams
from batch.history import history_arrays, history_mode, lineage_fields, merge_history, union_ids
from batch.model_store import ModelStore
from batch.plays import CountsBuilder, PlayCounts
from batch.training import train_and_publish
from stream.live_model import LiveModel

from .synthetic import random_plays, synthetic_counts

PARAMS = AlsParams(factors=4, iterations=2, seed=1)


def as_dict(counts: PlayCounts) -> dict[tuple[str, str], float]:
    m = counts.matrix.tocoo()
    return {(str(counts.user_ids[r]), str(counts.item_ids[c])): float(v) for r, c, v in zip(m.row, m.col, m.data)}


def snapshot(rows: dict[str, dict[str, int]]) -> PlayCounts:
    builder = CountsBuilder()
    for user, tracks in rows.items():
        builder.add_user(user)
        for track, n in tracks.items():
            builder.add(user, track, float(n))
    return builder.build()


def publish(store: ModelStore, counts: PlayCounts, **kwargs) -> str:
    return train_and_publish(counts, store, PARAMS, holdout=0, show_progress=False, forest=None, **kwargs).version


def test_union_ids_keeps_the_base_order_and_appends_new_ids():
    ids, where = union_ids(np.array(["b", "a", "c"]), np.array(["c", "x", "a", "y"]))
    assert ids.tolist() == ["b", "a", "c", "x", "y"]
    assert where.tolist() == [2, 3, 1, 4]
    ids, where = union_ids(np.array([], dtype=str), np.array(["x"]))
    assert ids.tolist() == ["x"] and where.tolist() == [0]


def test_merge_equals_a_from_scratch_count_over_two_cycles(tmp_path):
    """file -> retrain -> retrain: every cycle's input is file + the cumulative stream, never more."""
    store = ModelStore(tmp_path / "store")
    file_counts = synthetic_counts(random_plays(40, 30, 0.2, seed=3))
    publish(store, file_counts)
    live = store.load()
    assert history_mode(live.manifest) == "plays"
    first = {"u1": {"t2": 3, "new-track": 1}, "new-user": {"t0": 2}}
    merged = merge_history(live, snapshot(first))
    expected = as_dict(file_counts)
    for user, tracks in first.items():
        for track, n in tracks.items():
            expected[(user, track)] = expected.get((user, track), 0.0) + n
    assert as_dict(merged.counts) == expected
    assert merged.counts.user_ids[:40].tolist() == live.user_ids.tolist()  # live ids are a prefix
    publish(store, merged.counts, history=merged.history, lineage=lineage_fields(live, merged.history))
    second_live = store.load()
    assert second_live.manifest["history"]["arrays"] == "history"
    assert second_live.manifest["lineage"][0]["version"] == live.version
    # the stream's table is cumulative: the second snapshot holds the first one's plays too
    second = {"u1": {"t2": 5, "new-track": 1}, "new-user": {"t0": 2, "t1": 1}, "u7": {"t9": 4}}
    again = merge_history(second_live, snapshot(second))
    expected = as_dict(file_counts)
    for user, tracks in second.items():
        for track, n in tracks.items():
            expected[(user, track)] = expected.get((user, track), 0.0) + n
    assert as_dict(again.counts) == expected
    # the workers serve exactly the retrain's input: history + streamed
    served = LiveModel(second_live, use_index=False)
    row = again.counts.user_ids.tolist().index("u1")
    m = again.counts.matrix
    trained = {str(again.counts.item_ids[c]): float(v) for c, v in zip(m[row].indices, m[row].data)}
    assert served.full_counts("u1", second["u1"]) == trained
    assert served.full_counts("new-user", second["new-user"]) == {"t0": 2.0, "t1": 1.0}


def test_a_stream_only_lineage_has_no_history(tmp_path):
    store = ModelStore(tmp_path / "store")
    first = snapshot({"a": {"t1": 2, "t2": 1}, "b": {"t1": 1}})
    merged = merge_history(None, first)
    publish(store, merged.counts, history=None, lineage=lineage_fields(None, None))
    live = store.load()
    assert history_mode(live.manifest) is None and history_arrays(live) is None
    again = merge_history(live, snapshot({"a": {"t1": 3, "t2": 1}, "c": {"t3": 1}}))
    assert again.history is None
    assert as_dict(again.counts) == {("a", "t1"): 3.0, ("a", "t2"): 1.0, ("c", "t3"): 1.0}
    assert LiveModel(live, use_index=False).full_counts("a", {"t1": 3}) == {"t1": 3.0}


@pytest.mark.parametrize(("source", "mode"), [("stream", None), ("file", "plays"), (None, "plays")])
def test_manifests_without_a_history_field_keep_their_meaning(source, mode):
    manifest = {"input": {"source": source}} if source else {}
    assert history_mode(manifest) == mode
