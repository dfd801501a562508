"""Unit tests of the multi-level tree builder (index/tree_build.grow): structure, routing, determinism,
degenerate data, and 50-tree recall against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from index import HyperplaneForest
from index.tree_build import Grown, grow

DIM = 16


def _clustered(n: int, seed: int = 0, n_clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, DIM)) * 2.0
    sizes = 1.0 / np.arange(1, n_clusters + 1)
    lab = rng.choice(n_clusters, size=n, p=sizes / sizes.sum())
    x = (centers[lab] + rng.standard_normal((n, DIM))) * rng.lognormal(0.0, 0.4, (n, 1))
    return x.astype(np.float32)


def _descend(g: Grown, z: np.ndarray, root: int) -> tuple[np.ndarray, np.ndarray]:
    """Leaf reached by each row of ``z`` from node code ``root`` (the search's descent rule) and the
    smallest ``|margin|`` met on the way."""
    code = np.full(len(z), root, dtype=np.int64)
    tie = np.full(len(z), np.inf, dtype=np.float32)
    while (code >= 0).any():
        r = np.flatnonzero(code >= 0)
        c = code[r]
        m = np.einsum("ij,ij->i", g.normals[c], z[r]) - g.offsets[c]
        tie[r] = np.minimum(tie[r], np.abs(m))
        code[r] = g.children[c, (m > 0).astype(np.int64)]
    return -1 - code, tie


def _check_structure(
    g: Grown, seg_start: np.ndarray, seg_count: np.ndarray, items0: np.ndarray, leaf_size: int
) -> None:
    """Leaves partition every segment, hold <= leaf_size items, and every node is referenced once."""
    assert (g.leaf_count <= leaf_size).all() and (g.leaf_count > 0).all()
    assert len(g.normals) == len(g.offsets) == len(g.children)
    np.testing.assert_allclose(np.linalg.norm(g.normals, axis=1), 1.0, rtol=1e-4)
    codes = np.concatenate([g.children.ravel(), g.roots])
    inner, leaves = codes[codes >= 0], -1 - codes[codes < 0]
    assert np.array_equal(np.sort(inner), np.arange(len(g.offsets)))  # each internal node once
    assert np.array_equal(np.sort(leaves), np.arange(len(g.leaf_count)))  # each leaf once
    for a, c in zip(seg_start, seg_count):
        assert np.array_equal(np.sort(g.items[a : a + c]), np.sort(items0[a : a + c]))  # same items per segment
    starts = np.sort(g.leaf_start)
    counts = g.leaf_count[np.argsort(g.leaf_start)]
    assert np.array_equal(starts[1:], (starts + counts)[:-1])  # leaves tile the segments exactly
    for lf, p in enumerate(g.leaf_parent):  # leaf_parent points at the reference of the leaf
        if p >= 0:
            assert g.children[p // 2, p % 2] == -1 - lf
        else:
            assert g.roots[-1 - p] == -1 - lf


@pytest.mark.parametrize("levels", [1, 2, 4])
def test_grow_partitions_and_routes_every_item_to_its_leaf(levels: int) -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3000, DIM)).astype(np.float32)
    n_trees = 3
    items = np.tile(np.arange(3000, dtype=np.int32), n_trees)
    seg_start, seg_count = np.arange(n_trees) * 3000, np.full(n_trees, 3000)
    g = grow(items, seg_start, seg_count, z, 16, np.random.default_rng(1), levels=levels)
    _check_structure(g, seg_start, seg_count, items, 16)
    # continuous data: no split is degenerate, so every item descends to the leaf holding it, except
    # ties (an offset clipped to a sample's projection puts that item at margin ~0: the builder's BLAS
    # product and the search's einsum may round it to different sides)
    for t in range(n_trees):
        leaf, tie = _descend(g, z, int(g.roots[t]))
        holder = np.empty(3000, np.int64)
        mine = np.flatnonzero((g.leaf_start >= t * 3000) & (g.leaf_start < (t + 1) * 3000))
        for lf in mine:
            holder[g.items[g.leaf_start[lf] : g.leaf_start[lf] + g.leaf_count[lf]]] = lf
        off = leaf != holder
        assert off.mean() < 0.02 and (tie[off] < 1e-5).all()


def test_grow_segments_of_mixed_sizes_and_duplicates() -> None:
    """Segments as add() passes them (mixed sizes, small ones) and all-identical points terminate."""
    rng = np.random.default_rng(2)
    z = rng.standard_normal((500, DIM)).astype(np.float32)
    z[100:300] = z[100]  # 200 identical rows: splits are cut in half by position
    counts = np.array([300, 5, 17, 120, 58, 200])
    starts = np.cumsum(counts) - counts
    items = np.concatenate(
        [
            np.arange(0, 300),
            np.arange(300, 305),
            np.arange(305, 322),
            np.arange(322, 442),
            np.arange(442, 500),
            np.arange(100, 300),
        ]
    ).astype(np.int32)
    g = grow(items, starts, counts, z, 16, np.random.default_rng(3))
    _check_structure(g, starts, counts, items, 16)
    assert g.roots[1] < 0 and g.roots[0] >= 0  # a segment of 5 is a root leaf


def test_grow_is_deterministic_under_a_seed() -> None:
    z = _clustered(4000, seed=4)
    items = np.tile(np.arange(4000, dtype=np.int32), 4)
    args = (items, np.arange(4) * 4000, np.full(4, 4000), z, 32)
    a = grow(*args, np.random.default_rng(7))
    b = grow(*args, np.random.default_rng(7))
    c = grow(*args, np.random.default_rng(8))
    for name in ("normals", "offsets", "children", "leaf_start", "leaf_count", "leaf_parent", "roots", "items"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.items, c.items)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_fifty_trees_recall_against_brute_force(metric: str) -> None:
    x = _clustered(20000, seed=5)
    q = _clustered(300, seed=6)
    f = HyperplaneForest(DIM, metric, n_trees=50, leaf_size=64, seed=0).build(x, np.arange(len(x)))
    st = f.stats()
    assert st["trees"] == 50 and st["max_leaf"] <= 64
    s = q @ x.T
    if metric == "cosine":
        s = s / np.linalg.norm(x, axis=1)
    truth = np.argsort(-s, axis=1)[:, :10]
    for search_k, want in ((2000, 0.85), (6000, 0.97)):
        ids, scores = f.query_batch(q, k=10, search_k=search_k)  # tree walk (many leaves)
        rec = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, truth)])
        assert rec >= want, (search_k, rec)
        assert np.all(np.diff(scores, axis=1) <= 1e-5)


def test_build_in_several_tree_groups_merges_them(monkeypatch) -> None:
    """Trees grown in separate groups (big builds) are merged into one valid forest."""
    import index.forest as forest_mod

    x = _clustered(3000, seed=9)
    monkeypatch.setattr(forest_mod, "_GROUP_ELEMENTS", 2 * 3000)  # 2 trees per group: 4 groups
    f = HyperplaneForest(DIM, "dot", n_trees=7, leaf_size=32, seed=0).build(x, np.arange(3000))
    a = f._arrays()
    for t in range(7):  # every tree's leaves hold each item exactly once
        mine = []
        stack = [int(a["roots"][t])]
        while stack:
            c = stack.pop()
            if c < 0:
                mine.append(-1 - c)
            else:
                stack.extend(a["children"][c].tolist())
        rows = np.concatenate(
            [a["leaf_items"][a["leaf_start"][lf] : a["leaf_start"][lf] + a["leaf_count"][lf]] for lf in mine]
        )
        assert np.array_equal(np.sort(rows), np.arange(3000))
    for lf, p in enumerate(a["leaf_parent"]):
        assert (a["children"][p // 2, p % 2] if p >= 0 else a["roots"][-1 - p]) == -1 - lf
    q = _clustered(50, seed=10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    ids, _ = f.query_batch(q, k=10, search_k=3000)
    assert np.mean([len(set(i.tolist()) & set(t.tolist())) / 10 for i, t in zip(ids, truth)]) >= 0.95
