"""Unit tests of the leaf-scan selection helpers: padded per-row leaf ranking, k-th best, sort keys."""

from __future__ import annotations

import numpy as np
import pytest

from index import search


def _reference(qr, cent, bias, counts, search_k):
    """Per query: leaves by descending ``q . c + bias`` until ``search_k`` items (empty skipped)."""
    out = []
    for q in qr:
        s = cent @ q + bias
        order = np.argsort(-s, kind="stable")
        got, picked = 0, []
        for leaf in order:
            if not np.isfinite(s[leaf]) or got >= search_k:
                break
            if counts[leaf] > 0:
                picked.append(int(leaf))
                got += int(counts[leaf])
        out.append(picked)
    return out


@pytest.mark.parametrize("skew_counts", [False, True])
@pytest.mark.parametrize("n_leaf,search_k", [(4000, 600), (300, 900)])
def test_scan_leaves_matches_full_sort(skew_counts: bool, n_leaf: int, search_k: int) -> None:
    rng = np.random.default_rng(0)
    rdim, nq = 9, 150
    cent = rng.standard_normal((n_leaf, rdim)).astype(np.float32)
    qr = rng.standard_normal((nq, rdim)).astype(np.float32)
    counts = rng.integers(1, 64, n_leaf).astype(np.int32)
    counts[::17] = 0  # retired leaves
    if skew_counts:  # the best leaves hold one item: the sampled threshold is too high (exact redo)
        best = np.argsort(-(cent @ qr.mean(axis=0)))[: n_leaf // 5]
        counts[best] = 1
    bias = np.where(counts > 0, 0.01 * rng.random(n_leaf), -np.inf).astype(np.float32)
    pq, pl, prank = search.scan_leaves(qr, cent, bias, None, counts, search_k, float(counts[counts > 0].mean()))
    ref = _reference(qr, cent, bias, counts, search_k)
    assert np.all(np.diff(pq) >= 0)
    for i in range(nq):
        sel = pq == i
        assert pl[sel].tolist() == ref[i]
        assert prank[sel].tolist() == list(range(len(ref[i])))


def test_kth_best_matches_sort() -> None:
    rng = np.random.default_rng(1)
    nq, k = 50, 10
    per = rng.integers(0, 40, nq)
    q = np.repeat(np.arange(nq), per)
    s = rng.standard_normal(len(q)).astype(np.float32)
    kth, cnt = search.kth_best(q, s, nq, k)
    assert cnt.tolist() == per.tolist()
    for i in range(nq):
        v = np.sort(s[q == i])[::-1]
        assert kth[i] == (v[k - 1] if len(v) >= k else -np.inf)


def test_desc_key_orders_floats_descending() -> None:
    x = np.array([3.0, -1.0, 0.0, 2.5, -np.inf, np.inf, -7.0, 1e-30, -1e-30, 5e38 / 2], np.float32)
    o = np.argsort(search._desc_key(x), kind="stable")
    assert np.all(np.diff(x[o]) <= 0)
