"""Grow random-hyperplane trees level by level, vectorised over every node of a level.

A *segment* is a contiguous run of ``items`` (item row numbers) that one node owns. Each level
takes all segments larger than ``leaf_size`` and splits every one of them at once:

1. sample ``sample`` points of the segment, run ``iters`` steps of 2-means on the sample;
2. the split normal is the unit vector from centroid 0 to centroid 1, the offset is the midpoint
   projection clipped to the sample's ``[balance, 1 - balance]`` quantiles (bounded depth);
3. project every item of the segment (``margin = z . w - offset``; ``> 0`` goes to child 1) and
   partition the segment in place, stably, with prefix sums (no sort).

A segment whose split leaves one side empty (duplicates, zero vectors) is cut in half by position.
Node codes: ``c >= 0`` is internal node ``c``; ``c < 0`` is leaf ``-1 - c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK = 1 << 19  # floats per projection chunk: keeps temporaries cache-sized
_MATMUL_SEGS = 8  # up to this many nodes per tree in a level, project with one matmul per tree


def _project_rows(zp: np.ndarray, pos: np.ndarray, seg_of: np.ndarray, w: np.ndarray, off: np.ndarray,
                  side: np.ndarray) -> None:
    """``side[e] = zp[pos[e]] . w[seg_of[e]] > off[seg_of[e]]``, in cache-sized chunks.

    ``pos`` runs through whole segments in order, so rows of ``zp`` and of ``w`` are read almost
    sequentially; chunks keep every temporary in cache (big fresh arrays cost page faults).
    """
    step = max(1, _CHUNK // max(zp.shape[1], 1))
    for a in range(0, len(pos), step):
        b = min(a + step, len(pos))
        sg = seg_of[a:b]
        m = np.einsum("ij,ij->i", zp[pos[a:b]], np.take(w, sg, axis=0))
        side[a:b] = m > np.take(off, sg)


@dataclass
class Grown:
    """Nodes produced by :func:`grow`, with local numbering starting at 0.

    Shapes: ``normals (n_int, rdim) float32``, ``offsets (n_int,) float32``,
    ``children (n_int, 2) int32`` node codes, ``leaf_start (n_leaf,) int64`` positions in
    ``items``, ``leaf_count (n_leaf,) int32``, ``leaf_parent (n_leaf,) int64`` (``2 * node + side``
    or ``-1 - segment`` for a leaf that is a root), ``roots (n_segments,) int32`` node codes,
    ``items`` the permuted item rows (leaves are contiguous runs of it).
    """

    normals: np.ndarray
    offsets: np.ndarray
    children: np.ndarray
    leaf_start: np.ndarray
    leaf_count: np.ndarray
    leaf_parent: np.ndarray
    roots: np.ndarray
    items: np.ndarray


def _split_directions(
    zs: np.ndarray, rng: np.random.Generator, iters: int, balance: float
) -> tuple[np.ndarray, np.ndarray]:
    """2-means on per-segment samples ``zs (ns, S, d)``; return unit normals and offsets."""
    _ns, s, d = zs.shape
    c0 = zs[:, 0].copy()
    c1 = zs[:, 1].copy()
    sq = np.einsum("nsd,nsd->ns", zs, zs)
    for _ in range(iters):
        d0 = sq - 2.0 * np.einsum("nsd,nd->ns", zs, c0) + np.einsum("nd,nd->n", c0, c0)[:, None]
        d1 = sq - 2.0 * np.einsum("nsd,nd->ns", zs, c1) + np.einsum("nd,nd->n", c1, c1)[:, None]
        a1 = (d1 < d0).astype(np.float32)
        n1 = a1.sum(axis=1)
        n0 = s - n1
        m1 = np.einsum("ns,nsd->nd", a1, zs)
        m0 = zs.sum(axis=1) - m1
        ok0, ok1 = n0 > 0, n1 > 0
        c0[ok0] = m0[ok0] / n0[ok0, None]
        c1[ok1] = m1[ok1] / n1[ok1, None]
    w = c1 - c0
    norm = np.linalg.norm(w, axis=1)
    bad = ~(norm > 1e-12)
    if bad.any():  # identical centroids: fall back to a random direction
        w[bad] = rng.standard_normal((int(bad.sum()), d)).astype(np.float32)
        norm[bad] = np.linalg.norm(w[bad], axis=1)
    w /= norm[:, None]
    offset = 0.5 * np.einsum("nd,nd->n", w, c0 + c1)
    proj = np.sort(np.einsum("nsd,nd->ns", zs, w), axis=1)
    lo = int(balance * (s - 1))
    offset = np.clip(offset, proj[:, lo], proj[:, s - 1 - lo])
    return w.astype(np.float32), offset.astype(np.float32)


def grow(
    items: np.ndarray,
    seg_start: np.ndarray,
    seg_count: np.ndarray,
    z: np.ndarray,
    leaf_size: int,
    rng: np.random.Generator,
    *,
    sample: int = 32,
    iters: int = 3,
    balance: float = 0.2,
) -> Grown:
    """Split every segment of ``items`` recursively until each leaf holds ``<= leaf_size`` rows.

    ``items`` holds row numbers into ``z (n, rdim)`` (routing vectors); segment ``j`` is
    ``items[seg_start[j] : seg_start[j] + seg_count[j]]`` and becomes the root of one tree.
    """
    items = np.array(items, dtype=np.int32, copy=True)
    rdim = z.shape[1]
    z = np.asarray(z, dtype=np.float32)
    s_start = np.asarray(seg_start, dtype=np.int64)
    s_count = np.asarray(seg_count, dtype=np.int64)
    s_ref = -1 - np.arange(len(s_start), dtype=np.int64)
    s_root = np.arange(len(s_start), dtype=np.int64)

    normals: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    refs: list[np.ndarray] = []  # where each created node's code must be written
    codes: list[np.ndarray] = []
    leaf_start: list[np.ndarray] = []
    leaf_count: list[np.ndarray] = []
    leaf_parent: list[np.ndarray] = []
    n_int = 0
    n_leaf = 0
    while len(s_start):
        is_leaf = s_count <= leaf_size
        if is_leaf.any():
            k = int(is_leaf.sum())
            leaf_start.append(s_start[is_leaf])
            leaf_count.append(s_count[is_leaf].astype(np.int32))
            leaf_parent.append(s_ref[is_leaf])
            refs.append(s_ref[is_leaf])
            codes.append(-1 - (n_leaf + np.arange(k, dtype=np.int64)))
            n_leaf += k
        split = ~is_leaf
        if not split.any():
            break
        o = np.argsort(s_root[split], kind="stable")  # group each tree's segments together
        st, ct, rf, rt = s_start[split][o], s_count[split][o], s_ref[split][o], s_root[split][o]
        ns = len(st)
        node = n_int + np.arange(ns, dtype=np.int64)
        n_int += ns
        refs.append(rf)
        codes.append(node)

        pick = st[:, None] + (rng.random((ns, sample)) * ct[:, None]).astype(np.int64)
        w, off = _split_directions(z[items[pick]], rng, iters, balance)
        normals.append(w)
        offsets.append(off)

        # project and partition every element of the split segments
        total = int(ct.sum())
        first = np.concatenate([[0], np.cumsum(ct)[:-1]])
        seg_of = np.repeat(np.arange(ns, dtype=np.int32), ct)
        rank = np.arange(total, dtype=np.int64) - np.repeat(first, ct)
        seg_st = np.repeat(st, ct)
        pos = seg_st + rank
        vals = np.take(items, pos)
        side = np.empty(total, dtype=bool)
        roots_here, seg0, segs_per_root = np.unique(rt, return_index=True, return_counts=True)
        per_root = np.add.reduceat(ct, seg0)
        if segs_per_root.max() <= _MATMUL_SEGS:
            # shallow levels: per tree, rows @ normals.T (BLAS), then pick each row's column
            col = (np.arange(ns) - np.repeat(seg0, segs_per_root))[seg_of]
            el0 = np.concatenate([[0], np.cumsum(per_root)])
            for r in range(len(roots_here)):
                js = slice(seg0[r], seg0[r] + segs_per_root[r])
                wt = np.ascontiguousarray(w[js].T)
                step = max(1, _CHUNK // max(rdim, 1))
                for a in range(el0[r], el0[r + 1], step):
                    b = min(a + step, el0[r + 1])
                    proj = z[vals[a:b]] @ wt
                    m = np.take(proj, np.arange(b - a, dtype=np.int64) * proj.shape[1] + col[a:b])
                    side[a:b] = m > np.take(off[js], col[a:b])
        else:
            _project_rows(z, vals, seg_of, w, off, side)
        n_right = np.add.reduceat(side.astype(np.int64), first)
        degenerate = (n_right == 0) | (n_right == ct)
        if degenerate.any():
            bad_el = degenerate[seg_of]
            side[bad_el] = rank[bad_el] >= (ct // 2)[seg_of[bad_el]]
            n_right = np.add.reduceat(side.astype(np.int64), first)
        n_left = ct - n_right
        cum_left = np.cumsum(~side)
        left_before = np.repeat(cum_left[first] - (~side[first]), ct)
        left_upto = cum_left - left_before  # lefts up to and including this element
        newpos = np.where(side, seg_st + np.repeat(n_left, ct) + (rank - left_upto), seg_st + left_upto - 1)
        items[newpos] = vals

        s_start = np.concatenate([st, st + n_left])
        s_count = np.concatenate([n_left, n_right])
        s_ref = np.concatenate([2 * node, 2 * node + 1])
        s_root = np.concatenate([rt, rt])

    children = np.full((n_int, 2), np.iinfo(np.int32).min, dtype=np.int32)
    n_seg = len(seg_start)
    roots = np.zeros(n_seg, dtype=np.int32)
    if refs:
        all_refs = np.concatenate(refs)
        all_codes = np.concatenate(codes).astype(np.int32)
        inner = all_refs >= 0
        children[all_refs[inner] // 2, all_refs[inner] % 2] = all_codes[inner]
        roots[-1 - all_refs[~inner]] = all_codes[~inner]
    cat = np.concatenate
    return Grown(
        normals=cat(normals) if normals else np.zeros((0, rdim), np.float32),
        offsets=cat(offsets) if offsets else np.zeros(0, np.float32),
        children=children,
        leaf_start=cat(leaf_start) if leaf_start else np.zeros(0, np.int64),
        leaf_count=cat(leaf_count) if leaf_count else np.zeros(0, np.int32),
        leaf_parent=cat(leaf_parent) if leaf_parent else np.zeros(0, np.int64),
        roots=roots,
        items=items,
    )
