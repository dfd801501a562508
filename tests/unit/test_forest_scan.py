"""Unit tests of the forest's leaf-scan search mode (few big leaves, centroid ranking, grouped GEMM)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index import HyperplaneForest, StorageError

from .test_forest import DIM, _clustered, _exact, _random, _recall


def _scan(metric: str, n_trees: int = 1, leaf_size: int = 32, seed: int = 0) -> HyperplaneForest:
    return HyperplaneForest(DIM, metric, n_trees=n_trees, leaf_size=leaf_size, seed=seed, search_mode="scan")


@pytest.mark.parametrize("metric", ["dot", "cosine", "euclidean"])
@pytest.mark.parametrize("n_trees", [1, 3])
def test_scan_recall_against_brute_force(metric: str, n_trees: int) -> None:
    x = _clustered(6000, skew=0.5)
    q = _clustered(200, seed=1)
    f = _scan(metric, n_trees).build(x, np.arange(len(x)))
    assert f._use_scan(1000)
    truth = _exact(x, q, metric, 10)
    ids, scores = f.query_batch(q, k=10, search_k=1500)
    assert _recall(ids, truth) >= 0.9
    ids_all, _ = f.query_batch(q, k=10, search_k=6000 * n_trees)
    assert _recall(ids_all, truth) >= 0.999  # every leaf probed: exact
    assert all(len(set(r.tolist())) == 10 for r in ids)
    if metric == "euclidean":
        assert np.all(np.diff(scores, axis=1) >= -1e-5)
    else:
        assert np.all(np.diff(scores, axis=1) <= 1e-5)


def test_auto_mode_picks_scan_for_few_trees_and_tree_walk_for_many() -> None:
    x = _random(4000)
    one = HyperplaneForest(DIM, "dot", n_trees=1, leaf_size=32).build(x, np.arange(4000))
    assert one._use_scan(100)
    q = _random(50, seed=2)
    ids, _ = one.query_batch(q, k=10)  # default search_k = max(20 k n_trees, 1000 k): enough for one tree
    assert _recall(ids, _exact(x, q, "dot", 10)) >= 0.95
    many = HyperplaneForest(DIM, "dot", n_trees=20, leaf_size=8).build(x, np.arange(4000))
    assert not many._use_scan(1000)
    assert many._use_scan(10**6)
    with pytest.raises(ValueError, match="search_mode"):
        HyperplaneForest(DIM, "dot", search_mode="fast")


def test_scan_exclude_deny_remove_never_fewer_than_k() -> None:
    x = _clustered(4000, seed=4)
    q = _clustered(40, seed=5)
    f = _scan("dot").build(x, np.arange(4000))
    truth = _exact(x, q, "dot", 400)
    excl = [row[::2].tolist() for row in truth]  # half of each query's 400 best
    deny = truth[:, 1].tolist()
    removed = truth[:, 3]
    f.remove(np.unique(removed))
    ids, scores = f.query_batch(q, k=10, search_k=400, exclude=excl, deny=deny)
    assert (ids >= 0).all() and np.isfinite(scores).all()
    banned_all = set(deny) | set(removed.tolist())
    for row, e in zip(ids, excl):
        assert not set(row.tolist()) & (set(e) | banned_all)
        assert len(set(row.tolist())) == 10
    # the best remaining items are found: compare with brute force over the eligible set
    alive = np.ones(4000, bool)
    alive[list(banned_all)] = False
    s = q @ x.T
    s[:, ~alive] = -np.inf
    for i, e in enumerate(excl):
        s[i, e] = -np.inf
    want = np.argsort(-s, axis=1)[:, :10]
    assert _recall(ids, want) >= 0.9


def test_scan_insert_after_build() -> None:
    x = _clustered(9000, seed=11, skew=0.5)
    f = _scan("dot").build(x[:6000], np.arange(6000))
    f.add(x[6000:7500], np.arange(6000, 7500))
    f.add(x[7500:], np.arange(7500, 9000))
    assert len(f) == 9000 and f.stats()["max_leaf"] <= 32
    q = _clustered(300, seed=12)
    truth = _exact(x, q, "dot", 10)
    ids, _ = f.query_batch(q, k=10, search_k=1500)
    g = _scan("dot").build(x, np.arange(9000))
    ids_r, _ = g.query_batch(q, k=10, search_k=1500)
    assert _recall(ids, truth) >= _recall(ids_r, truth) - 0.03
    new = truth >= 6000
    hit = np.array([[t in set(r.tolist()) for t in row] for r, row in zip(ids, truth)])
    hit_r = np.array([[t in set(r.tolist()) for t in row] for r, row in zip(ids_r, truth)])
    assert new.sum() > 50 and hit[new].mean() >= hit_r[new].mean() - 0.05
    # an inserted vector finds itself (cosine: exact direction)
    c = _scan("cosine").build(x[:6000], np.arange(6000))
    c.add(x[6000:], np.arange(6000, 9000))
    got, _ = c.query_batch(x[6000::100], k=1, search_k=1000)
    assert np.mean(got[:, 0] == np.arange(6000, 9000, 100)) >= 0.97


def test_scan_save_load_and_version1_files(tmp_path) -> None:
    x = _clustered(3000, seed=8, skew=0.5)
    f = _scan("cosine", n_trees=2).build(x, np.arange(3000))
    q = _random(50, seed=9)
    want_ids, want_s = f.query_batch(q, k=10, search_k=600)
    f.save(tmp_path, prefix="forest")
    g = HyperplaneForest.load(tmp_path, prefix="forest", mmap=True)
    assert g.search_mode == "scan" and isinstance(g._arrays()["leaf_centroid"].base, np.memmap)
    ids, s = g.query_batch(q, k=10, search_k=600)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(s, want_s)
    # a version-1 file set (no leaf statistics) still loads; the statistics are recomputed
    meta_path = tmp_path / "forest.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    for name in ("leaf_centroid", "leaf_radius"):
        meta["arrays"].pop(name)
        (tmp_path / f"forest.{name}.npy").unlink()
    meta_path.write_text(json.dumps(meta))
    h = HyperplaneForest.load(tmp_path, prefix="forest", mmap=True)
    np.testing.assert_allclose(h._arrays()["leaf_centroid"], f._arrays()["leaf_centroid"], atol=1e-5)
    ids, _ = h.query_batch(q, k=10, search_k=600)
    assert _recall(ids, want_ids) >= 0.98
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StorageError, match="version"):
        HyperplaneForest.load(tmp_path, prefix="forest")


def test_scan_is_deterministic_and_batch_independent() -> None:
    x = _clustered(5000, seed=3, skew=0.3)
    q = _clustered(300, seed=4)
    a = _scan("dot", seed=7).build(x, np.arange(5000))
    b = _scan("dot", seed=7).build(x, np.arange(5000))
    ia, sa = a.query_batch(q, k=10, search_k=800)
    ib, sb = b.query_batch(q, k=10, search_k=800, batch_size=37)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-6)
    one, _ = a.query(q[5], k=10, search_k=800)
    assert _recall(one[None], ia[5:6]) >= 0.9


@pytest.mark.parametrize("metric", ["dot", "cosine", "euclidean"])
@pytest.mark.parametrize("refine", [None, 0])
def test_one_query_path_answers_as_the_batch_path(metric: str, refine: int | None) -> None:
    """`query()` (one query: the single-query scan) returns what `query_batch` returns for the same
    query among others (the grouped batch scan): same leaves, same candidates, same exclusions."""
    x = _clustered(6000, seed=8, skew=0.3)
    q = _clustered(60, seed=9)
    f = HyperplaneForest(DIM, metric, n_trees=1, leaf_size=48, seed=2, refine=refine).build(x, np.arange(6000))
    truth = _exact(x, q, metric, 60)
    f.remove(np.unique(truth[:, 2]))
    excl = [row[::3].tolist() for row in truth]
    deny = truth[:, 5].tolist()
    for search_k in (100, 700, 6000):
        ids, scores = f.query_batch(q, k=10, search_k=search_k, exclude=excl, deny=deny)
        for i in range(len(q)):
            one, one_scores = f.query(q[i], k=10, search_k=search_k, exclude=excl[i], deny=deny)
            assert set(one.tolist()) == set(ids[i].tolist()), (search_k, i)
            np.testing.assert_allclose(one_scores, scores[i], rtol=1e-5, atol=1e-5)
