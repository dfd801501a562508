"""Grow random-hyperplane trees several levels per pass, vectorised over many nodes at once.

A *segment* is a contiguous run of ``items`` (item row numbers) that one node owns. A *round*
takes the segments larger than ``leaf_size`` (in batches of similar sizes) and grows a *mini-tree*
of up to ``levels`` levels under each of them:

1. **Splits from a pool.** Draw a pool of ``sample << (levels - 1)`` random items of the segment
   (with replacement, at most the segment's size). Depth by depth, each mini-node takes the first
   ``sample`` pool points that reached it, runs ``iters`` steps of 2-means on them (vectorised over
   every mini-node of the depth), and gets the unit normal from centroid 0 to centroid 1 and the
   midpoint offset clipped to the points' ``[balance, 1 - balance]`` projection quantiles (bounded
   imbalance => bounded depth); the pool points are then routed one level down. A mini-node whose
   pool share predicts at most ``leaf_size`` items, or that holds too few pool points, gets no split.
2. **One projection for several levels.** Every item of the segment is projected onto all the
   mini-tree's normals at once (a stacked BLAS product ``rows @ normals.T``, ``2^levels - 1``
   columns, in padded pieces of ~16K rows) and walked down the mini-tree with the margins
   (``margin = z . w - offset``, ``> 0`` goes to child 1); its code is the mini-leaf it reaches.
3. **Partition.** One stable radix sort of ``(segment, code)`` orders each segment by code, so
   every mini-node owns a contiguous run. Then, top down: a node with ``<= leaf_size`` items is a
   leaf; a node with a split whose children are both non-empty is an internal node; a split that
   leaves one side empty (duplicates, zero vectors) is kept with its children cut in half by
   position; a node without split (or below the mini-tree) becomes a segment of the next round.

Node codes: ``c >= 0`` is internal node ``c``; ``c < 0`` is leaf ``-1 - c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_PIECE_ROWS = 1 << 14  # rows per projection piece (pieces of a batch are padded to one length)
_SUB_ROWS = 1 << 16  # padded rows per stacked product: temporaries stay a few MB
_BATCH_ROWS = 1 << 21  # items per round batch
_POOL_ROWS = 1 << 17  # pool points per round batch (segments x pool)
_NODE_CHUNK = 1024  # mini-nodes per 2-means block
_MIN_POOL = 8  # a mini-node needs this many pool points to get a split in this round
_EST_LEAF = 1.0  # no split when the pool predicts <= leaf_size items (it will most likely be a leaf)


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


class _Nodes:
    """Accumulates created nodes; ``ref`` is where a node's code goes (``2 * parent + side`` or
    ``-1 - segment``)."""

    def __init__(self, rdim: int) -> None:
        self.rdim = rdim
        self.normals: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        self.refs: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.leaf_start: list[np.ndarray] = []
        self.leaf_count: list[np.ndarray] = []
        self.leaf_parent: list[np.ndarray] = []
        self.n_int = 0
        self.n_leaf = 0

    def internal(self, w: np.ndarray, off: np.ndarray, ref: np.ndarray) -> np.ndarray:
        ids = self.n_int + np.arange(len(ref), dtype=np.int64)
        self.n_int += len(ref)
        self.normals.append(w)
        self.offsets.append(off)
        self.refs.append(ref)
        self.codes.append(ids)
        return ids

    def leaves(self, start: np.ndarray, count: np.ndarray, ref: np.ndarray) -> None:
        if not len(ref):
            return
        self.leaf_start.append(np.asarray(start, np.int64))
        self.leaf_count.append(np.asarray(count, np.int32))
        self.leaf_parent.append(ref)
        self.refs.append(ref)
        self.codes.append(-1 - (self.n_leaf + np.arange(len(ref), dtype=np.int64)))
        self.n_leaf += len(ref)

    def finish(self, n_seg: int, items: np.ndarray) -> Grown:
        children = np.full((self.n_int, 2), np.iinfo(np.int32).min, dtype=np.int32)
        roots = np.zeros(n_seg, dtype=np.int32)
        cat = np.concatenate
        if self.refs:
            refs = cat(self.refs)
            codes = cat(self.codes).astype(np.int32)
            inner = refs >= 0
            children[refs[inner] // 2, refs[inner] % 2] = codes[inner]
            roots[-1 - refs[~inner]] = codes[~inner]
        return Grown(
            normals=cat(self.normals) if self.normals else np.zeros((0, self.rdim), np.float32),
            offsets=cat(self.offsets) if self.offsets else np.zeros(0, np.float32),
            children=children,
            leaf_start=cat(self.leaf_start) if self.leaf_start else np.zeros(0, np.int64),
            leaf_count=cat(self.leaf_count) if self.leaf_count else np.zeros(0, np.int32),
            leaf_parent=cat(self.leaf_parent) if self.leaf_parent else np.zeros(0, np.int64),
            roots=roots,
            items=items,
        )


def merge(parts: list[Grown]) -> Grown:
    """One :class:`Grown` from several grown independently (segments, nodes, leaves and items of
    ``parts[i]`` follow those of ``parts[i - 1]``): a build grafts once instead of re-copying every
    array per group of trees."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, list[np.ndarray]] = {k: [] for k in Grown.__dataclass_fields__}
    i0 = l0 = s0 = e0 = 0
    for g in parts:

        def remap(codes: np.ndarray, i0: int = i0, l0: int = l0) -> np.ndarray:
            c = codes.astype(np.int64)
            return np.where(c >= 0, c + i0, c - l0).astype(np.int32)

        out["normals"].append(g.normals)
        out["offsets"].append(g.offsets)
        out["children"].append(remap(g.children))
        out["leaf_start"].append(g.leaf_start + e0)
        out["leaf_count"].append(g.leaf_count)
        out["leaf_parent"].append(np.where(g.leaf_parent >= 0, g.leaf_parent + 2 * i0, g.leaf_parent - s0))
        out["roots"].append(remap(g.roots))
        out["items"].append(g.items)
        i0, l0, s0, e0 = i0 + len(g.offsets), l0 + len(g.leaf_count), s0 + len(g.roots), e0 + len(g.items)
    return Grown(**{k: np.concatenate(v) for k, v in out.items()})


def _split_directions(
    zs: np.ndarray, rng: np.random.Generator, iters: int, balance: float
) -> tuple[np.ndarray, np.ndarray]:
    """2-means on per-node samples ``zs (m, S, d)``; return unit normals and offsets.

    A point goes to centroid 1 when ``|z - c1| < |z - c0|``, i.e. ``z . (c1 - c0) > (|c1|^2 - |c0|^2) / 2``
    (one product per step instead of two distances)."""
    _m, s, d = zs.shape
    c0 = zs[:, 0].copy()
    c1 = zs[:, 1].copy()
    assign = np.empty((len(zs), 2, s), np.float32)  # rows: members of centroid 0, of centroid 1
    for _ in range(iters):
        half = 0.5 * (np.einsum("nd,nd->n", c1, c1) - np.einsum("nd,nd->n", c0, c0))
        np.greater(np.matmul(zs, (c1 - c0)[:, :, None])[:, :, 0], half[:, None], out=assign[:, 1])
        np.subtract(1.0, assign[:, 1], out=assign[:, 0])
        sums = np.matmul(assign, zs)  # (m, 2, d)
        n1 = assign[:, 1].sum(axis=1)
        n0 = s - n1
        ok0, ok1 = n0 > 0, n1 > 0
        c0[ok0] = sums[ok0, 0] / n0[ok0, None]
        c1[ok1] = sums[ok1, 1] / n1[ok1, None]
    w = c1 - c0
    norm = np.linalg.norm(w, axis=1)
    bad = ~(norm > 1e-12)
    if bad.any():  # identical centroids: fall back to a random direction
        w[bad] = rng.standard_normal((int(bad.sum()), d)).astype(np.float32)
        norm[bad] = np.linalg.norm(w[bad], axis=1)
    w /= norm[:, None]
    offset = 0.5 * np.einsum("nd,nd->n", w, c0 + c1)
    proj = np.sort(np.matmul(zs, w[:, :, None])[:, :, 0], axis=1)
    lo = int(balance * (s - 1))
    offset = np.clip(offset, proj[:, lo], proj[:, s - 1 - lo])
    return w.astype(np.float32), offset.astype(np.float32)


def _mini_splits(
    items: np.ndarray,
    z: np.ndarray,
    st: np.ndarray,
    ct: np.ndarray,
    levels: int,
    pool: int,
    leaf_size: int,
    rng: np.random.Generator,
    sample: int,
    iters: int,
    balance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normals ``(ns, Q, rdim)``, offsets ``(ns, Q)`` and has-split ``(ns, Q)`` of each segment's
    mini-tree in heap order (node ``h`` has children ``2h + 1``, ``2h + 2``; ``Q = 2^levels - 1``)."""
    ns, rdim = len(st), z.shape[1]
    q = (1 << levels) - 1
    pos = st[:, None] + (rng.random((ns, pool)) * ct[:, None]).astype(np.int64)
    zp = np.take(z, np.take(items, pos), axis=0)  # (ns, pool, rdim)
    zp2 = zp.reshape(-1, rdim)
    w_all = np.zeros((ns, q, rdim), np.float32)
    off_all = np.zeros((ns, q), np.float32)
    has = np.zeros((ns, q), bool)
    node = np.zeros((ns, pool), np.int64)  # heap node each pool point has reached
    seg = np.arange(ns, dtype=np.int64)[:, None]
    take = np.arange(sample)
    for j in range(levels):
        v0, nv = (1 << j) - 1, 1 << j
        local = node - v0  # < 0: stopped above this depth
        key = np.where(local >= 0, local, nv)
        cnt = np.bincount((seg * (nv + 1) + key).ravel(), minlength=ns * (nv + 1)).reshape(ns, nv + 1)[:, :nv]
        want = (cnt >= min(_MIN_POOL, pool)) & (cnt * (ct[:, None] / pool) > _EST_LEAF * leaf_size)
        if j == 0:
            want[:] = True  # every segment here has more than leaf_size items
        s_i, v_i = np.nonzero(want)
        if not len(s_i):
            break
        order = np.argsort(key, axis=1, kind="stable") + seg * pool  # flat pool index, by node
        first = np.cumsum(cnt, axis=1) - cnt
        p0 = s_i * pool + first[s_i, v_i]
        c_i = cnt[s_i, v_i]
        for a in range(0, len(s_i), _NODE_CHUNK):  # chunks of nodes: the (m, sample, rdim) block stays small
            b = min(a + _NODE_CHUNK, len(s_i))
            pick = np.take(order, p0[a:b, None] + take % c_i[a:b, None])
            w, off = _split_directions(np.take(zp2, pick, axis=0), rng, iters, balance)
            w_all[s_i[a:b], v0 + v_i[a:b]] = w
            off_all[s_i[a:b], v0 + v_i[a:b]] = off
        has[s_i, v0 + v_i] = True
        if j + 1 < levels:  # route the pool one level down (all of a depth's normals per segment: BLAS)
            proj = np.matmul(zp, w_all[:, v0 : v0 + nv].transpose(0, 2, 1))  # (ns, pool, nv)
            lc = np.maximum(local, 0)
            m = np.take_along_axis(proj, lc[:, :, None], axis=2)[:, :, 0] > np.take_along_axis(
                off_all[:, v0 : v0 + nv], lc, 1
            )
            go = (local >= 0) & np.take_along_axis(has[:, v0 : v0 + nv], lc, 1)
            node = np.where(go, 2 * node + 1 + m, node)
    return w_all, off_all, has


def _route(
    z: np.ndarray,
    vals: np.ndarray,
    fst: np.ndarray,
    ct: np.ndarray,
    w_all: np.ndarray,
    off_all: np.ndarray,
    levels: int,
) -> np.ndarray:
    """Mini-leaf code ``(E,) uint8`` of every item ``vals`` (segment ``s`` = ``vals[fst[s]:][:ct[s]]``)."""
    ns, q, rdim = w_all.shape
    code = np.empty(len(vals), np.uint8)
    npc = (ct + _PIECE_ROWS - 1) // _PIECE_ROWS
    pseg = np.repeat(np.arange(ns), npc)
    k = np.arange(len(pseg)) - np.repeat(np.cumsum(npc) - npc, npc)
    poff = fst[pseg] + k * _PIECE_ROWS
    plen = np.minimum(_PIECE_ROWS, ct[pseg] - k * _PIECE_ROWS)
    o = np.argsort(-plen, kind="stable")
    # q + 1 = 2^levels columns (one zero column): an even column count is ~1.6x faster in sgemm here
    wt = np.zeros((ns, rdim, q + 1), np.float32)
    wt[:, :, :q] = w_all.transpose(0, 2, 1)
    off = np.zeros((ns, 1, q + 1), np.float32)
    off[:, 0, :q] = off_all
    n_buf = int(min(_SUB_ROWS, plen.max() * len(plen)))
    rows_buf = np.empty((n_buf, rdim), np.float32)  # reused: fresh big temporaries cost page faults
    proj_buf = np.empty((n_buf, q + 1), np.float32)
    a = 0
    while a < len(o):
        m = int(plen[o[a]])
        sel = o[a : a + max(1, _SUB_ROWS // m)]
        a += len(sel)
        ps = pseg[sel]
        # pad every piece to m rows by repeating its last row (same code, written twice)
        idx = poff[sel][:, None] + np.minimum(np.arange(m), plen[sel][:, None] - 1)
        nr = idx.size
        rows = np.take(z, np.take(vals, idx.ravel()), axis=0, out=rows_buf[:nr], mode="clip")
        proj = np.matmul(rows.reshape(len(sel), m, rdim), wt[ps], out=proj_buf[:nr].reshape(len(sel), m, q + 1))
        gt = (proj > off[ps]).reshape(-1)
        base = np.arange(0, len(gt), q + 1, dtype=np.int64)
        t = np.zeros(nr, np.int64)
        for _ in range(levels):
            t = 2 * t + 1 + np.take(gt, base + t)
        code[idx.ravel()] = t - q
    return code


def _levels_needed(ct: np.ndarray, leaf_size: int) -> np.ndarray:
    """Levels of even splits that bring ``ct`` items to at most ``leaf_size`` per node (>= 1)."""
    return np.maximum(np.ceil(np.log2(np.maximum(ct / leaf_size, 1.0))).astype(np.int64), 1)


def _round(
    items: np.ndarray,
    z: np.ndarray,
    st: np.ndarray,
    ct: np.ndarray,
    ref: np.ndarray,
    leaf_size: int,
    rng: np.random.Generator,
    out: _Nodes,
    sample: int,
    iters: int,
    balance: float,
    lv: int,
    pool: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow a mini-tree of ``lv`` levels under each segment (all larger than ``leaf_size``), with
    splits from ``pool`` random items per segment; return the segments left for the next round
    ``(start, count, ref)``."""
    ns = len(st)
    nl = 1 << lv
    w_all, off_all, has = _mini_splits(items, z, st, ct, lv, pool, leaf_size, rng, sample, iters, balance)

    fst = np.cumsum(ct) - ct
    n_el = int(ct.sum())
    seg_of = np.repeat(np.arange(ns, dtype=np.int64), ct)
    pos = np.repeat(st - fst, ct) + np.arange(n_el, dtype=np.int64)
    vals = np.take(items, pos)
    code = _route(z, vals, fst, ct, w_all, off_all, lv)
    key = (seg_of * nl + code).astype(np.uint16)  # ns * nl <= 2^16: a radix sort
    cnt = np.bincount(key, minlength=ns * nl).reshape(ns, nl)
    items[pos] = np.take(vals, np.argsort(key, kind="stable"))  # stable radix sort by (segment, code)

    # structure, depth by depth (vectorised over segments and the nodes of a depth)
    ccum = np.concatenate([np.zeros((ns, 1), np.int64), np.cumsum(cnt, axis=1)], axis=1)
    nxt_st: list[np.ndarray] = []
    nxt_ct: list[np.ndarray] = []
    nxt_ref: list[np.ndarray] = []
    node_ref = ref[:, None]  # (ns, nv): where each node of this depth is referenced from
    exists = np.ones((ns, 1), bool)
    for j in range(lv + 1):
        nv, span = 1 << j, nl >> j
        c = cnt.reshape(ns, nv, span).sum(axis=2)
        start = st[:, None] + ccum[:, :nl:span]
        leaf = exists & (c <= leaf_size)
        out.leaves(start[leaf], c[leaf], node_ref[leaf])
        if j < lv:
            h = (1 << j) - 1 + np.arange(nv)
            split = exists & ~leaf & has[:, h]
            cc = cnt.reshape(ns, nv, 2, span // 2).sum(axis=3)
            cut = split & ((cc[:, :, 0] == 0) | (cc[:, :, 1] == 0))  # one side empty: cut in half
        else:
            split = cut = np.zeros_like(leaf)
        trunc = exists & ~leaf & ~split
        nxt_st.append(start[trunc])
        nxt_ct.append(c[trunc])
        nxt_ref.append(node_ref[trunc])
        if not split.any():
            break
        s_i, v_i = np.nonzero(split)
        ids = out.internal(w_all[s_i, h[v_i]], off_all[s_i, h[v_i]], node_ref[split])
        node_id = np.full((ns, nv), -1, np.int64)
        node_id[s_i, v_i] = ids
        if cut.any():
            s_c, v_c = np.nonzero(cut)
            c_c, st_c, id_c = c[s_c, v_c], start[s_c, v_c], node_id[s_c, v_c]
            nxt_st.append(np.concatenate([st_c, st_c + c_c // 2]))
            nxt_ct.append(np.concatenate([c_c // 2, c_c - c_c // 2]))
            nxt_ref.append(np.concatenate([2 * id_c, 2 * id_c + 1]))
        child_parent = np.repeat(node_id, 2, axis=1)
        exists = (child_parent >= 0) & ~np.repeat(cut, 2, axis=1)
        node_ref = 2 * child_parent + (np.arange(2 * nv) & 1)
    return np.concatenate(nxt_st), np.concatenate(nxt_ct), np.concatenate(nxt_ref)


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
    levels: int = 4,
) -> Grown:
    """Split every segment of ``items`` recursively until each leaf holds ``<= leaf_size`` rows.

    ``items`` holds row numbers into ``z (n, rdim)`` (routing vectors); segment ``j`` is
    ``items[seg_start[j] : seg_start[j] + seg_count[j]]`` and becomes the root of one tree.
    ``levels``: depth of the mini-tree grown per round (``2^levels - 1`` normals per projection).
    """
    items = np.array(items, dtype=np.int32, copy=True)
    z = np.ascontiguousarray(z, dtype=np.float32)
    out = _Nodes(z.shape[1])
    st = np.asarray(seg_start, dtype=np.int64)
    ct = np.asarray(seg_count, dtype=np.int64)
    ref = -1 - np.arange(len(st), dtype=np.int64)
    while len(st):
        leaf = ct <= leaf_size
        out.leaves(st[leaf], ct[leaf], ref[leaf])
        st, ct, ref = st[~leaf], ct[~leaf], ref[~leaf]
        if not len(st):
            break
        o = np.argsort(-ct, kind="stable")  # batches of similar sizes: little padding
        st, ct, ref = st[o], ct[o], ref[o]
        need = _levels_needed(ct, leaf_size)
        cum = np.cumsum(ct)
        parts = []
        a = 0
        while a < len(st):
            lv = min(levels, int(need[a]) + 1)  # one spare level for unbalanced splits
            pool = min(sample << (min(int(need[a]), levels) - 1), int(ct[a]))
            b = int(np.searchsorted(cum, (cum[a - 1] if a else 0) + _BATCH_ROWS, side="right"))
            b = min(
                max(b, a + 1),
                a + (1 << 16 >> lv),
                a + max(1, _POOL_ROWS // max(pool, 1)),
                a + int(np.searchsorted(-need[a:], -need[a], side="right")),
            )
            parts.append(
                _round(
                    items, z, st[a:b], ct[a:b], ref[a:b], leaf_size, rng, out, sample, iters, balance, lv, max(pool, 2)
                )
            )
            a = b
        st, ct, ref = (np.concatenate(p) for p in zip(*parts))
    return out.finish(len(seg_start), items)
