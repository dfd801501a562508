"""Unit tests of the Lloyd refinement of a one-tree forest's leaves (index/refine.py, leaf scan)."""

from __future__ import annotations

import numpy as np
import pytest

from index import HyperplaneForest
from index import refine as refine_mod
from index.transforms import items_to_routing

from .test_forest import DIM, _clustered, _exact, _recall


def _forest(refine: int | None = None, leaf_size: int = 32, seed: int = 0, metric: str = "dot") -> HyperplaneForest:
    return HyperplaneForest(DIM, metric, n_trees=1, leaf_size=leaf_size, seed=seed, refine=refine)


def _leaf_rows(f: HyperplaneForest) -> list[np.ndarray]:
    a = f._arrays()
    return [
        a["leaf_items"][a["leaf_start"][lf] : a["leaf_start"][lf] + a["leaf_count"][lf]]
        for lf in range(len(a["leaf_count"]))
    ]


def _reachable_leaves(f: HyperplaneForest) -> set[int]:
    a = f._arrays()
    out, stack = set(), [int(a["roots"][0])]
    while stack:
        c = stack.pop()
        if c < 0:
            out.add(-1 - c)
        else:
            stack.extend(a["children"][c].tolist())
    return out


def test_defaults_and_validation() -> None:
    assert _forest().refine == refine_mod_default()
    assert HyperplaneForest(DIM, "dot", n_trees=1, search_mode="tree").refine == 0
    assert HyperplaneForest(DIM, "dot", n_trees=3).refine == 0
    with pytest.raises(ValueError, match="n_trees=1"):
        HyperplaneForest(DIM, "dot", n_trees=2, refine=2)
    with pytest.raises(ValueError, match="refine"):
        HyperplaneForest(DIM, "dot", n_trees=1, refine=-1)


def refine_mod_default() -> int:
    import index.forest as forest_mod

    return forest_mod._REFINE_PASSES


@pytest.mark.parametrize("metric", ["dot", "cosine", "euclidean"])
def test_refinement_keeps_every_item_in_exactly_one_leaf(metric: str) -> None:
    x = _clustered(5000, seed=2, skew=0.5)
    f = _forest(refine=4, metric=metric).build(x, np.arange(5000))
    a = f._arrays()
    reach = _reachable_leaves(f)
    rows = np.concatenate([r for lf, r in enumerate(_leaf_rows(f)) if a["leaf_count"][lf]])
    assert np.array_equal(np.sort(rows), np.arange(5000))  # each item exactly once
    nonempty = np.flatnonzero(a["leaf_count"] > 0)
    assert set(nonempty.tolist()) <= reach  # every item can still be reached from the tree
    assert a["leaf_count"].max() <= 32 and f.stats()["max_leaf"] <= 32
    for lf in nonempty:  # leaf_parent of live leaves still points back at them
        p = a["leaf_parent"][lf]
        assert (a["children"][p // 2, p % 2] if p >= 0 else a["roots"][-1 - p]) == -1 - lf
    # centroids are the means of the leaves' routing vectors
    z = items_to_routing(x, metric, f.ref_norm)
    for lf in nonempty[:50]:
        r = _leaf_rows(f)[lf]
        np.testing.assert_allclose(a["leaf_centroid"][lf], z[r].mean(axis=0), atol=1e-5)


def test_lloyd_never_increases_the_squared_error_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4000, 8)).astype(np.float32)
    labels = rng.integers(0, 100, 4000)

    def sse(lab: np.ndarray) -> float:
        c, _ = refine_mod.centroids(z, lab, 100)
        return float(((z - c[lab]) ** 2).sum())

    prev = sse(labels)
    lab = labels
    for _ in range(3):
        lab = refine_mod.lloyd(z, lab, 100, 1)
        cur = sse(lab)
        assert cur <= prev + 1e-3
        prev = cur
    np.testing.assert_array_equal(refine_mod.lloyd(z, labels, 100, 4), refine_mod.lloyd(z, labels, 100, 4))
    assert sse(refine_mod.lloyd(z, labels, 100, 4)) <= sse(labels)


def test_refinement_improves_recall_at_equal_search_k() -> None:
    x = _clustered(20000, seed=5, skew=0.6)
    q = _clustered(300, seed=6)
    truth = _exact(x, q, "dot", 10)
    plain = _forest(refine=0).build(x, np.arange(20000))
    refined = _forest(refine=6).build(x, np.arange(20000))
    r0 = _recall(plain.query_batch(q, k=10, search_k=600)[0], truth)
    r1 = _recall(refined.query_batch(q, k=10, search_k=600)[0], truth)
    assert r1 >= r0 - 0.01 and r1 >= 0.85, (r0, r1)


def test_refined_forest_save_load_round_trip(tmp_path) -> None:
    x = _clustered(4000, seed=8, skew=0.5)
    q = _clustered(60, seed=9)
    f = _forest(refine=3).build(x, np.arange(4000))
    want = f.query_batch(q, k=10, search_k=500)
    f.save(tmp_path, prefix="forest")
    g = HyperplaneForest.load(tmp_path, prefix="forest", mmap=True)
    assert g.refine == 3
    got = g.query_batch(q, k=10, search_k=500)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # inserts into the loaded (memory-mapped) forest go exactly where they go in the original
    f.add(x[:100] * 1.01, np.arange(4000, 4100))
    g.add(x[:100] * 1.01, np.arange(4000, 4100))
    for name in ("leaf_count", "leaf_items", "leaf_start"):
        np.testing.assert_array_equal(f._arrays()[name], g._arrays()[name])


def test_add_after_refinement_finds_new_items_and_never_returns_removed() -> None:
    x = _clustered(12000, seed=11, skew=0.5)
    f = _forest(refine=4).build(x[:8000], np.arange(8000))
    f.add(x[8000:10000], np.arange(8000, 10000))
    f.add(x[10000:], np.arange(10000, 12000))
    assert len(f) == 12000 and f.stats()["max_leaf"] <= 32
    rows = np.concatenate([r for lf, r in enumerate(_leaf_rows(f)) if f._arrays()["leaf_count"][lf]])
    assert np.array_equal(np.sort(rows), np.arange(12000))
    q = _clustered(300, seed=12)
    truth = _exact(x, q, "dot", 10)
    ids, _ = f.query_batch(q, k=10, search_k=1200)
    rebuilt = _forest(refine=4).build(x, np.arange(12000))
    ids_r, _ = rebuilt.query_batch(q, k=10, search_k=1200)
    assert _recall(ids, truth) >= _recall(ids_r, truth) - 0.03
    new = truth >= 8000
    hit = np.array([[t in set(r.tolist()) for t in row] for r, row in zip(ids, truth)])
    assert new.sum() > 50 and hit[new].mean() >= 0.85
    # an inserted vector is routed to the leaf with the nearest centroid and finds itself (cosine)
    c = _forest(refine=4, metric="cosine").build(x[:8000], np.arange(8000))
    c.add(x[8000:], np.arange(8000, 12000))
    got, _ = c.query_batch(x[8000::100], k=1, search_k=800)
    assert np.mean(got[:, 0] == np.arange(8000, 12000, 100)) >= 0.97
    # removed items are never returned
    gone = np.unique(truth[:, :3])
    f.remove(gone)
    ids, _ = f.query_batch(q, k=10, search_k=1200)
    assert not set(ids.ravel().tolist()) & set(gone.tolist())
    assert (ids >= 0).all()


def test_refined_build_is_deterministic() -> None:
    x = _clustered(5000, seed=3, skew=0.3)
    a = _forest(refine=3, seed=7).build(x, np.arange(5000))
    b = _forest(refine=3, seed=7).build(x, np.arange(5000))
    for name in ("leaf_items", "leaf_count", "leaf_start", "children", "leaf_centroid"):
        np.testing.assert_array_equal(a._arrays()[name], b._arrays()[name])
