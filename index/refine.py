"""Lloyd (k-means) refinement of a tree's leaf partition in routing space (leaf-scan forests).

The tree's leaves come from 2-means hyperplane splits on 32 sampled points with clipped offsets:
balanced, but loose clusters. The leaf scan only needs a partition whose leaves are tight around
their centroids (the leaf score is ``q . c + 0.2 r``), so a few Lloyd passes starting from the
tree's leaves make every leaf's items closer to its centroid and cut the candidates needed for a
given recall (about 5x at 1M ALS-like MIPS items, ``docs/BENCHMARKS-forest.md``).

Each pass: centroids of the current labels (one sparse product), for every leaf its ``n_near``
nearest centroids (blocked GEMM + a threshold from ``np.partition``), then every item moves to its
nearest centroid among the candidates of the leaves of its chunk (chunks of ~16 consecutive leaves:
one small GEMM per chunk against the union of their candidates). Leaves may grow beyond
``leaf_size`` (k-means is not balanced); the caller splits those with the tree builder.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_NEAR = 16  # candidate centroids per leaf
_CHUNK_LEAVES = 16  # leaves per assignment chunk (the union of their candidates: <= 256 centroids)
_BLOCK = 2048  # leaves per neighbour GEMM block
_FAR = np.float32(1e30)  # penalty of empty leaves (finite: no inf * 0 in the product)
_NBR_STEP = 4  # neighbour threshold from every 4th column (a sample: 4x cheaper partition)
_NBR_EVERY = 3  # recompute the neighbour lists every 3 passes (they drift slowly)


def centroids(z: np.ndarray, labels: np.ndarray, n_leaf: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean routing vector ``(n_leaf, rdim)`` of each label and the counts ``(n_leaf,)``."""
    n = len(labels)
    counts = np.bincount(labels, minlength=n_leaf).astype(np.int64)
    ind = sp.csr_matrix(
        (np.ones(n, np.float32), labels.astype(np.int64), np.arange(n + 1, dtype=np.int64)), shape=(n, n_leaf)
    )
    cent = np.asarray((ind.T @ z), dtype=np.float32)
    nz = counts > 0
    cent[nz] /= counts[nz, None].astype(np.float32)
    return cent, counts


def _neighbours(cent: np.ndarray, live: np.ndarray, n_near: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged lists of the ``n_near`` nearest live centroids of every leaf: ``(indptr, nbr)``."""
    n_leaf = len(cent)
    csq = np.einsum("ij,ij->i", cent, cent)
    pen = np.where(live, csq, _FAR).astype(np.float32)
    n_near = min(n_near, int(live.sum()))
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    buf = np.empty((min(_BLOCK, n_leaf), n_leaf), dtype=np.float32)
    # 2 c_a . c_b - pen_b (larger is nearer) as one product: [2 c_a, -1] @ [c_b, pen_b].T
    lhs = np.concatenate([2.0 * cent, -np.ones((n_leaf, 1), np.float32)], axis=1)
    rhs_t = np.ascontiguousarray(np.concatenate([cent, pen[:, None]], axis=1).T)
    for a in range(0, n_leaf, _BLOCK):
        b = min(a + _BLOCK, n_leaf)
        g = np.matmul(lhs[a:b], rhs_t, out=buf[: b - a])
        if _NBR_STEP > 1 and n_leaf >= 64 * n_near:
            sub = g[:, ::_NBR_STEP]
            r = max(1, n_near // _NBR_STEP)
            thr = np.partition(sub, sub.shape[1] - r, axis=1)[:, sub.shape[1] - r]
        else:
            thr = np.partition(g, n_leaf - n_near, axis=1)[:, n_leaf - n_near]
        r, c = np.nonzero(g >= thr[:, None])
        rows.append(r + a)
        cols.append(c)
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n_leaf))])
    return indptr, c  # np.nonzero is row-major: already grouped by leaf


def _assign(
    z: np.ndarray, labels: np.ndarray, counts: np.ndarray, cent: np.ndarray, pen: np.ndarray, indptr, nbr
) -> np.ndarray:
    """One assignment step: every row of ``z`` to the nearest centroid (``2 z . c - pen``, larger
    is nearer) among the candidates of the leaves of its chunk; rows with no finite candidate keep
    their label."""
    n_leaf = len(counts)
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    new = labels.copy()
    for a in range(0, n_leaf, _CHUNK_LEAVES):
        b = min(a + _CHUNK_LEAVES, n_leaf)
        r0, r1 = int(bounds[a]), int(bounds[b])
        if r1 == r0:
            continue
        cand = np.unique(nbr[indptr[a] : indptr[b]])
        rows = order[r0:r1]
        s = np.take(z, rows, axis=0) @ cent[cand].T
        s *= 2.0
        s -= pen[cand]
        best = np.argmax(s, axis=1)
        ok = np.isfinite(s[np.arange(len(rows)), best])
        new[rows[ok]] = cand[best[ok]]
    return new


def lloyd(z: np.ndarray, labels: np.ndarray, n_leaf: int, passes: int, n_near: int = _NEAR) -> np.ndarray:
    """``passes`` Lloyd passes from ``labels (n,)`` (leaf of each row of ``z``); returns new labels.

    Deterministic (no randomness); labels stay in ``0 .. n_leaf - 1`` (a leaf may become empty).
    Tiny leaves are kept on purpose: dissolving leaves of fewer than 2-8 items into their
    neighbours cut recall@10 at equal ``search_k`` from 0.95 to 0.84-0.94 at 1M MIPS items (they
    hold isolated long vectors, the likely MIPS winners)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    indptr = nbr = None
    for p in range(passes):
        cent, counts = centroids(z, labels, n_leaf)
        if p % _NBR_EVERY == 0:
            indptr, nbr = _neighbours(cent, counts > 0, n_near)
        labels = _assign(z, labels, counts, cent, np.einsum("ij,ij->i", cent, cent), indptr, nbr)
    return labels
