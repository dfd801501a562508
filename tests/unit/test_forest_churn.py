"""Unit tests of forest churn (issue #12 item 7): capacity growth, removals out of the leaves, row
reuse, compaction, the incremental id lookup, and save / load / mmap after churn."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from index import HyperplaneForest
from index import lookup as lookup_mod
from index import search as search_mod

from .test_forest import DIM, _clustered, _exact, _recall


def _leaf_rows(f: HyperplaneForest) -> np.ndarray:
    """Every item row held by a leaf slot (each live item once per tree)."""
    a = f._arrays()
    return a["leaf_items"][search_mod.ragged_ranges(a["leaf_start"], a["leaf_count"])]


def _assert_consistent(f: HyperplaneForest) -> None:
    """Leaves hold exactly the live rows, n_trees times each; the lookup finds every live id."""
    a = f._arrays()
    held = np.bincount(_leaf_rows(f), minlength=len(a["alive"]))
    assert (held[a["alive"]] == f.n_trees).all() and (held[~a["alive"]] == 0).all()
    assert len(f) == int(a["alive"].sum())
    rows, found = f._rows_of(a["ids"][a["alive"]])
    assert found.all() and (rows == np.flatnonzero(a["alive"])).all()


def _resolve_rounds(f: HyperplaneForest, vecs: np.ndarray, ids: np.ndarray, rounds: int, batch: int, seed: int):
    """The worker's re-solve pattern: per batch remove(ids) then add(perturbed vectors, same ids)."""
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for b in range(0, len(ids), batch):
            sl = slice(b, b + batch)
            vecs[sl] += 0.05 * rng.standard_normal(vecs[sl].shape).astype(np.float32)
            f.remove(ids[sl])
            f.add(vecs[sl], ids[sl])
        yield


def test_single_adds_grow_capacity_geometrically_without_copying_rows() -> None:
    x = _clustered(1300, seed=1)
    f = HyperplaneForest(DIM, "dot", n_trees=2, leaf_size=16, seed=0).build(x[:300], np.arange(300))
    f.add(x[300:301], [300])  # the first change copies the build's (caller's) arrays into owned buffers
    caps, copies = [f.stats()["row_capacity"]], 0
    for i in range(301, 1300):
        before = f._arrays()["vectors"]
        f.add(x[i : i + 1], [i])
        copies += not np.shares_memory(before, f._arrays()["vectors"])
        caps.append(f.stats()["row_capacity"])
    grown = sorted(set(caps))
    assert copies == len(grown) - 1 <= 8  # 300 -> 1300 rows at x1.25: ~6 reallocations, not 1000
    assert all(b >= 1.2 * a for a, b in itertools.pairwise(grown))
    assert f.reallocations < 150  # every array together (today's code: ~15 concatenations per add)
    assert len(f) == 1300 and f.stats()["rows"] == 1300
    _assert_consistent(f)


def test_add_and_remove_do_not_resort_the_id_lookup() -> None:
    x = _clustered(3000, seed=2)
    ids = np.array([f"t{i}" for i in range(3000)])
    f = HyperplaneForest(DIM, "cosine", n_trees=1, leaf_size=32, seed=0).build(x[:2000], ids[:2000])
    base = f._arrays()["lookup_rows"]
    for b in range(2000, 3000, 100):
        f.add(x[b : b + 100], ids[b : b + 100])
        f.remove(ids[b - 1000 : b - 950])
    assert f._arrays()["lookup_rows"] is base  # no O(n log n) re-sort per call: a delta dict
    assert len(f) == 2500 and "t1000" not in f and "t999" in f and "t1999" in f and "t2999" in f


def test_lookup_merges_its_delta_and_matches_a_dict(monkeypatch) -> None:
    monkeypatch.setattr(lookup_mod, "MERGE_MIN", 8)
    rng = np.random.default_rng(3)
    x = _clustered(1500, seed=3)
    f = HyperplaneForest(DIM, "dot", n_trees=2, leaf_size=16, seed=0).build(x[:500], np.arange(500) * 7)
    truth = {int(i) * 7: True for i in range(500)}
    nxt = 5000
    for _ in range(30):
        gone = rng.choice(sorted(truth), 20, replace=False)
        f.remove(gone)
        for g in gone:
            del truth[int(g)]
        new = np.arange(nxt, nxt + 25)
        nxt += 25
        f.add(x[rng.integers(0, 1500, 25)], new)
        truth.update(dict.fromkeys(new.tolist(), True))
    probe = np.array([*sorted(truth), 1, 3, 10**9])
    _rows, found = f._rows_of(probe)
    assert found.tolist() == [p in truth for p in probe.tolist()]
    assert len(f) == len(truth)
    _assert_consistent(f)


def test_removed_items_leave_the_leaves_and_their_rows_are_reused() -> None:
    x = _clustered(3000, seed=4)
    f = HyperplaneForest(DIM, "euclidean", n_trees=4, leaf_size=16, seed=0).build(x, np.arange(3000))
    f.remove(np.arange(0, 3000, 10))
    assert not np.isin(_leaf_rows(f), np.arange(0, 3000, 10)).any()  # was: masked, left in the leaves
    assert f.stats()["dead_rows"] == 300
    _assert_consistent(f)
    f.add(x[:300] + 0.1, np.arange(10_000, 10_300))
    assert f.stats()["rows"] == 3000 and f.stats()["dead_rows"] == 0  # the 300 free rows were reused
    _assert_consistent(f)
    got, d = f.query_batch(x[:300:30] + 0.1, k=1, search_k=2000)
    assert got[:, 0].tolist() == list(range(10_000, 10_300, 30)) and np.allclose(d, 0, atol=1e-3)


@pytest.mark.parametrize("n_trees", [1, 3])
def test_resolving_the_same_ids_ten_times_keeps_rows_and_bytes_bounded(n_trees: int) -> None:
    x = _clustered(3300, seed=5, skew=0.3)
    ids = np.array([f"track-{i}" for i in range(3300)])
    f = HyperplaneForest(DIM, "dot", n_trees=n_trees, leaf_size=32, seed=0).build(x[:3000], ids[:3000])
    vecs = x[3000:].copy()
    f.add(vecs, ids[3000:])
    sizes = []
    for _ in _resolve_rounds(f, vecs, ids[3000:], rounds=10, batch=50, seed=6):
        st = f.stats()
        assert len(f) == 3300 and st["rows"] == 3300 and st["dead_rows"] == 0  # was 3300 + 300 per round
        sizes.append(f.nbytes)
    assert max(sizes) <= 1.1 * sizes[0]
    _assert_consistent(f)
    allx = np.vstack([x[:3000], vecs])
    q = _clustered(100, seed=7)
    got, _ = f.query_batch(q, k=10, search_k=3300 * n_trees * 4)
    assert _recall(got, ids[_exact(allx, q, "dot", 10)]) >= 0.98
    rows, found = f._rows_of(ids[3000:])
    assert found.all()
    np.testing.assert_array_equal(f._arrays()["vectors"][rows], vecs)  # the latest vectors


@pytest.mark.parametrize(("metric", "n_trees"), [("dot", 1), ("cosine", 6), ("euclidean", 3)])
def test_compaction_keeps_answers_identical_and_bounds_dead_rows(metric: str, n_trees: int) -> None:
    x = _clustered(4000, seed=8, skew=0.4)
    f = HyperplaneForest(DIM, metric, n_trees=n_trees, leaf_size=16, seed=0).build(x, np.arange(4000))
    f.add(x[:500] * 1.01, np.arange(4000, 4500))  # regrown leaves: retired leaf slots to repack
    f.remove(np.arange(0, 4000, 5))  # 800 dead of 4500 rows: under 25%, kept
    st = f.stats()
    assert st["dead_rows"] == 800 and st["compactions"] == 0 and st["unused_slots"] > 0
    q = _clustered(60, seed=9)
    excl = [list(range(i, i + 40)) for i in range(60)]
    want = f.query_batch(q, k=10, search_k=800, exclude=excl, deny=range(100, 200))
    out = f.compact()
    st = f.stats()
    assert out == {"rows_dropped": 800, "slots_dropped": out["slots_dropped"]} and out["slots_dropped"] > 0
    assert st["rows"] == len(f) == 3700 and st["dead_rows"] == 0 and st["unused_slots"] == 0
    got = f.query_batch(q, k=10, search_k=800, exclude=excl, deny=range(100, 200))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    _assert_consistent(f)
    # removals beyond 25% of the rows compact by themselves: dead rows stay bounded
    for lo in range(1, 4000, 400):
        f.remove(np.arange(lo, lo + 400, 2), missing_ok=True)
        st = f.stats()
        assert st["dead_rows"] <= max(1024, 0.25 * st["rows"])
    assert f.stats()["compactions"] >= 2
    _assert_consistent(f)
    f.add(x[1:3] * 2, [1, 3])  # ids removed, compacted away, and added again
    assert 1 in f and 3 in f


@pytest.mark.parametrize("mmap", [True, False])
def test_save_after_churn_loads_and_answers_the_same(tmp_path, mmap: bool) -> None:
    x = _clustered(2200, seed=10, skew=0.5)
    ids = np.array([f"t{i}" for i in range(2200)])
    f = HyperplaneForest(DIM, "dot", n_trees=1, leaf_size=32, seed=0).build(x[:2000], ids[:2000])
    vecs = x[2000:].copy()
    f.add(vecs, ids[2000:])
    for _ in _resolve_rounds(f, vecs, ids[2000:], rounds=3, batch=40, seed=11):
        pass
    f.remove(ids[:30])  # 30 dead rows, saved with alive = false
    assert f.stats()["row_capacity"] > f.stats()["rows"]  # spare capacity, not saved
    q = _clustered(40, seed=12)
    want = f.query_batch(q, k=10, exclude=[ids[i : i + 20] for i in range(40)])
    f.save(tmp_path)
    meta = json.loads((tmp_path / "forest.json").read_text())
    assert meta["arrays"]["vectors"]["shape"] == [2200 + 0, DIM] and meta["arrays"]["lookup_rows"]["shape"] == [2170]
    g = HyperplaneForest.load(tmp_path, mmap=mmap)
    assert len(g) == 2170 and g.stats()["dead_rows"] == 30
    got = g.query_batch(q, k=10, exclude=[ids[i : i + 20] for i in range(40)])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # the loaded forest goes on exactly like the original
    for h in (f, g):
        h.remove(ids[2000:2050])
        h.add(vecs[:50] * 1.02, ids[2000:2050])
        _assert_consistent(h)
    np.testing.assert_array_equal(g.query_batch(q, k=10)[0], f.query_batch(q, k=10)[0])


def test_mmap_loaded_forest_is_copied_before_churn(tmp_path) -> None:
    x = _clustered(1500, seed=13)
    f = HyperplaneForest(DIM, "cosine", n_trees=2, leaf_size=16, seed=0).build(x, np.arange(1500))
    paths = f.save(tmp_path)
    before = {p.name: p.read_bytes() for p in paths}
    g = HyperplaneForest.load(tmp_path, mmap=True)
    assert isinstance(g._arrays()["vectors"].base, np.memmap)
    vecs = x[:100].copy()
    g.remove(np.arange(100))
    g.add(vecs * 1.1, np.arange(100))
    for name in ("vectors", "ids", "alive", "leaf_items", "leaf_count", "lookup_rows"):
        assert not isinstance(g._arrays()[name].base, np.memmap), name
    assert {p.name: p.read_bytes() for p in paths} == before  # files never written
    _assert_consistent(g)


def test_build_keeps_callers_arrays_and_never_writes_them() -> None:
    x = _clustered(1000, seed=14)
    ids = np.arange(1000)
    x0, ids0 = x.copy(), ids.copy()
    f = HyperplaneForest(DIM, "dot", n_trees=2, leaf_size=16, seed=0).build(x, ids)
    assert np.shares_memory(f._arrays()["vectors"], x)  # no copy at build
    f.remove(ids[:50])
    f.add(x[:50] * 3.0, ids[:50] + 5000)  # reuses the 50 freed rows
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(ids, ids0)


def test_reused_rows_take_longer_string_ids() -> None:
    x = _clustered(600, seed=15)
    f = HyperplaneForest(DIM, "euclidean", n_trees=2, leaf_size=16, seed=0).build(x, [f"a{i}" for i in range(600)])
    f.remove([f"a{i}" for i in range(10)])
    long_ids = [f"a-much-longer-track-id-{i}" for i in range(10)]
    f.add(x[:10], long_ids)  # rows of the removed items, wider dtype
    got, _ = f.query_batch(x[:10], k=1)
    assert got[:, 0].tolist() == long_ids
    assert all(i in f for i in long_ids) and "a0" not in f and "a10" in f
    assert "a5999" not in f and "a599" in f  # ids wider than the lookup's keys are not truncated


def test_forest_saved_with_removed_items_in_leaves_still_loads(tmp_path) -> None:
    """Files written before this change: removed items masked by ``alive`` but still in the leaves."""
    x = _clustered(1200, seed=16)
    f = HyperplaneForest(DIM, "dot", n_trees=1, leaf_size=16, seed=0).build(x, np.arange(1200))
    f.save(tmp_path)
    gone = np.arange(0, 1200, 3)
    alive = np.ones(1200, bool)
    alive[gone] = False
    np.save(tmp_path / "forest.alive.npy", alive)
    lookup = np.flatnonzero(alive)
    np.save(tmp_path / "forest.lookup_rows.npy", lookup)
    meta = json.loads((tmp_path / "forest.json").read_text())
    del meta["leaves_hold_live_items_only"]
    meta["arrays"]["lookup_rows"]["shape"] = [len(lookup)]
    (tmp_path / "forest.json").write_text(json.dumps(meta))
    g = HyperplaneForest.load(tmp_path, mmap=True)
    assert np.isin(_leaf_rows(g), gone).any()  # the old layout
    q = _clustered(50, seed=17)
    got, _ = g.query_batch(q, k=10)
    assert len(g) == 800 and not np.isin(got, gone).any() and (got >= 0).all()
    g.add(x[:5] * 1.5, np.arange(5000, 5005))  # first change: removed items leave the leaves
    _assert_consistent(g)
    got, _ = g.query_batch(q, k=10)
    assert not np.isin(got, gone).any()
