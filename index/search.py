"""Batched forest search: shared best-first frontier, candidate gather, exact re-rank, top-k.

All functions work on a block of queries at once with numpy array operations; there is no Python
loop per query or per candidate (only per tree level, per memory-sized chunk of queries and, in
the leaf scan, per leaf touched by a block of queries).

Two search modes. *Tree walk* (below, many trees with small leaves) and *leaf scan* (further down,
few trees with bigger leaves: centroid ranking of all leaves plus a grouped-GEMM re-rank).

Search (per query, vectorised over the block): the frontier starts at every tree's root with
priority ``+inf``. One step expands every internal node of the frontier: ``m = w . q - offset``,
child 1 gets ``min(p, m)`` and child 0 gets ``min(p, -m)`` (Annoy's priority). Leaves leave the
frontier with their priority. The frontier keeps the ``beam`` best nodes of all trees together,
i.e. one shared priority queue whose tail beyond ``beam`` is dropped. Finally the collected leaves
are taken best priority first until ``search_k`` candidates (with duplicates across trees) are
gathered, like Annoy's loop ``while nns.size() < search_k``.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import scipy.sparse as sp

NEG_INF = np.float32(-np.inf)
_GATHER_ROWS = 1 << 16  # candidate rows gathered per re-rank chunk (~10 MB of float32 at dim 40)


def _rows_take(arr: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(arr, sel, axis=1)`` for 2-D arrays, via one flat ``np.take``."""
    flat = sel + (np.arange(arr.shape[0], dtype=np.int64) * arr.shape[1])[:, None]
    return np.take(arr, flat)


def collect_leaves(
    qr: np.ndarray,
    roots: np.ndarray,
    normals: np.ndarray,
    offsets: np.ndarray,
    children: np.ndarray,
    beam: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Walk all trees for routing queries ``qr (nq, rdim)``.

    Returns ``(leaf_ids, priorities)``, both ``(nq, L)``; unused slots have priority ``-inf``.
    """
    nq = qr.shape[0]
    codes = np.broadcast_to(roots.astype(np.int32), (nq, len(roots))).copy()
    prio = np.full(codes.shape, np.inf, dtype=np.float32)
    qcol = np.ascontiguousarray(qr)[:, :, None]
    got_leaf: list[np.ndarray] = []
    got_prio: list[np.ndarray] = []
    while codes.shape[1]:
        live = prio > NEG_INF
        leaf = codes < 0
        is_leaf = leaf & live
        if is_leaf.any():
            cols = np.flatnonzero(is_leaf.any(axis=0))
            got_leaf.append(-1 - codes[:, cols])
            got_prio.append(np.where(is_leaf[:, cols], prio[:, cols], NEG_INF))
        inner = live & ~leaf
        any_inner = inner.any(axis=0)
        if not any_inner.any():
            break
        if not any_inner.all():
            cols = np.flatnonzero(any_inner)
            inner, codes, prio = inner[:, cols], codes[:, cols], prio[:, cols]
        c = np.where(inner, codes, 0)
        p = np.where(inner, prio, NEG_INF)
        m = np.matmul(np.take(normals, c, axis=0), qcol)[..., 0] - np.take(offsets, c)
        ch = np.take(children, c, axis=0)
        codes = np.concatenate([ch[..., 0], ch[..., 1]], axis=1)
        prio = np.concatenate([np.minimum(p, -m), np.minimum(p, m)], axis=1)
        width = int((prio > NEG_INF).sum(axis=1).max())
        keep = min(beam, width)
        if keep < codes.shape[1]:
            sel = np.argpartition(-prio, keep - 1, axis=1)[:, :keep]
            codes = _rows_take(codes, sel)
            prio = _rows_take(prio, sel)
    if not got_leaf:
        return np.zeros((nq, 0), np.int32), np.zeros((nq, 0), np.float32)
    return np.concatenate(got_leaf, axis=1), np.concatenate(got_prio, axis=1)


def gather_candidates(
    leaf_ids: np.ndarray,
    leaf_prio: np.ndarray,
    leaf_start: np.ndarray,
    leaf_count: np.ndarray,
    leaf_items: np.ndarray,
    search_k: int,
    max_leaves: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Take leaves best-first until ``search_k`` items per query; return padded candidates.

    Only the ``max_leaves`` best leaves per query are considered. Returns ``cand (nq, C) int32``
    item rows and ``n_cand (nq,)``; ``cand[i, n_cand[i]:]`` is 0.
    """
    nq = leaf_ids.shape[0]
    if max_leaves < leaf_prio.shape[1]:
        top = np.argpartition(-leaf_prio, max_leaves - 1, axis=1)[:, :max_leaves]
        leaf_ids, leaf_prio = _rows_take(leaf_ids, top), _rows_take(leaf_prio, top)
    order = np.argsort(-leaf_prio, axis=1, kind="stable")
    lid = _rows_take(leaf_ids, order)
    lp = _rows_take(leaf_prio, order)
    cnt = np.where(lp > NEG_INF, np.take(leaf_count, lid), 0).astype(np.int64)
    cum = np.cumsum(cnt, axis=1)
    sel = ((cum - cnt) < search_k) & (cnt > 0)
    cnt = np.where(sel, cnt, 0)
    n_cand = cnt.sum(axis=1)
    width = max(int(n_cand.max()) if nq else 0, 1)
    cand = np.zeros((nq, width), dtype=np.int32)
    rows, cols = np.nonzero(sel)
    c = cnt[rows, cols]
    col0 = (cum - cnt)[rows, cols]
    start = np.take(leaf_start, lid[rows, cols])
    total = int(c.sum())
    first = np.cumsum(c) - c
    within = np.arange(total, dtype=np.int64) - np.repeat(first, c)
    flat = np.repeat(rows * width + col0, c) + within
    cand.ravel()[flat] = np.take(leaf_items, np.repeat(start, c) + within)
    return cand, n_cand


def rerank_scores(vectors: np.ndarray, cand: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Raw inner products ``vectors[cand[i, j]] . queries[i]`` as ``(nq, C)`` float32."""
    nq, width = cand.shape
    out = np.empty((nq, width), dtype=np.float32)
    step = max(1, _GATHER_ROWS // max(width, 1))
    for a in range(0, nq, step):
        b = min(a + step, nq)
        g = np.take(vectors, cand[a:b], axis=0)
        out[a:b] = np.matmul(g, queries[a:b, :, None])[..., 0]
    return out


def topk_distinct(
    scores: np.ndarray,
    cand: np.ndarray,
    k: int,
    banned: np.ndarray | None,
    n_rows_total: int,
    start_m: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best ``k`` distinct items per row by ``scores`` (higher is better, ``-inf`` = unusable).

    ``banned`` holds sorted int64 keys ``row * n_rows_total + item`` to skip. Returns item rows
    ``(nq, k)`` (``-1`` where missing), their scores ``(nq, k)`` and the count found ``(nq,)``.
    """
    nq, width = scores.shape
    out_i = np.full((nq, k), -1, dtype=np.int64)
    out_s = np.full((nq, k), NEG_INF, dtype=np.float32)
    found = np.zeros(nq, dtype=np.int64)
    todo = np.arange(nq)
    m = min(width, max(start_m, k))
    while len(todo):
        s = scores[todo]
        if m < width:
            part = np.argpartition(-s, m - 1, axis=1)[:, :m]
        else:
            part = np.broadcast_to(np.arange(width), (len(todo), width))
        sc = np.take_along_axis(s, part, axis=1)
        it = np.take_along_axis(cand[todo], part, axis=1).astype(np.int64)
        if banned is not None and len(banned):
            keys = todo[:, None] * n_rows_total + it
            pos = np.minimum(np.searchsorted(banned, keys), len(banned) - 1)
            sc = np.where(banned[pos] == keys, NEG_INF, sc)
        o = np.argsort(it, axis=1, kind="stable")
        it = np.take_along_axis(it, o, axis=1)
        sc = np.take_along_axis(sc, o, axis=1)
        dup = np.zeros(it.shape, dtype=bool)
        dup[:, 1:] = it[:, 1:] == it[:, :-1]
        sc = np.where(dup, NEG_INF, sc)
        good = (sc > NEG_INF).sum(axis=1)
        done = (good >= k) | (m >= width)
        if done.any():
            d = np.flatnonzero(done)
            kk = min(k, sc.shape[1])
            top = np.argsort(-sc[d], axis=1, kind="stable")[:, :kk]
            ts = np.take_along_axis(sc[d], top, axis=1)
            ti = np.take_along_axis(it[d], top, axis=1)
            ok = ts > NEG_INF
            out_s[todo[d], :kk] = np.where(ok, ts, NEG_INF)
            out_i[todo[d], :kk] = np.where(ok, ti, -1)
            found[todo[d]] = np.minimum(good[d], k)
        todo = todo[~done]
        m = min(width, m * 4)
    return out_i, out_s, found


# ----------------------------------------------------------------------------- leaf scan mode
# Few, big leaves (e.g. one tree, leaf_size 64-128 at 1M items): instead of walking trees with
# margins, every leaf is scored from its routing-space centroid ``c`` and radius ``r`` (one BLAS
# product per query block), and the exact re-rank runs leaf by leaf: all queries of a block that
# probe a leaf are scored against its vectors with one small GEMM (``Q_leaf @ V_leaf.T``), so each
# leaf's vectors are read once per block instead of once per query.

LEAF_RADIUS_WEIGHT = np.float32(0.2)  # leaf score = q.c + 0.2 r (tuned at 200K / 1M, see BENCHMARKS)
_SCAN_QUERIES = 128  # queries per centroid-scan product (a 13 MB score buffer at 25.6K leaves)
_CELLS = 1 << 21  # (pair, slot) score cells per re-rank chunk (8 MB of float32)
_SAMPLE_STEP = 8  # the leaf threshold comes from every 8th leaf score
_THR_MARGIN = 1.6  # sampled leaf threshold: expect this many times the leaves needed
_STATS_CHUNK = 1 << 19  # floats per leaf-radius chunk (cache-sized temporaries)


def leaf_stats(z: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``(m, rdim)`` and radii ``(m,)`` of ``m`` leaves whose routing vectors are the
    consecutive row runs of ``z`` with lengths ``counts`` (a run may be empty).

    Sums are one sparse (leaf x row indicator) product; radii come from ``|z - c|^2`` in
    cache-sized runs of whole leaves and one ``maximum.reduceat``."""
    m = len(counts)
    cent = np.zeros((m, z.shape[1]), dtype=np.float32)
    rad = np.zeros(m, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    nz = counts > 0
    if not nz.any():
        return cent, rad
    z = np.asarray(z, dtype=np.float32)
    n_rows = int(counts.sum())
    indptr = np.concatenate([[0], np.cumsum(counts)])
    ind = sp.csr_matrix((np.ones(n_rows, np.float32), np.arange(n_rows, dtype=np.int64), indptr), shape=(m, n_rows))
    cent[:] = ind @ z
    cent[nz] /= counts[nz, None].astype(np.float32)
    d2 = np.empty(n_rows, dtype=np.float32)
    step = max(1, _STATS_CHUNK // max(z.shape[1], 1))
    a = 0
    while a < m:  # runs of whole leaves with about `step` rows
        b = max(a + 1, int(np.searchsorted(indptr, indptr[a] + step, side="right")) - 1)
        r0, r1 = indptr[a], indptr[b]
        d = z[r0:r1] - np.repeat(cent[a:b], counts[a:b], axis=0)
        d2[r0:r1] = np.einsum("ij,ij->i", d, d)
        a = b
    rad[nz] = np.sqrt(np.maximum.reduceat(d2, indptr[:-1][nz]))
    return cent, rad


def ragged_ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start[i], start[i] + count[i])`` for all ``i``."""
    count = np.asarray(count, dtype=np.int64)
    total = int(count.sum())
    return np.repeat(np.asarray(start, dtype=np.int64) - (np.cumsum(count) - count), count) + np.arange(total)


def _leaf_scores(
    qr: np.ndarray, centroid: np.ndarray, bias: np.ndarray, cent_sq: np.ndarray | None, out: np.ndarray
) -> np.ndarray:
    """Leaf scores into ``out`` (a reused buffer: big fresh arrays cost page faults)."""
    s = np.matmul(qr, centroid.T, out=out)
    if cent_sq is not None:
        qq = np.einsum("ij,ij->i", qr, qr)[:, None]
        s *= -2.0
        s += qq
        s += cent_sq
        np.maximum(s, 0.0, out=s)
        np.sqrt(s, out=s)
        np.negative(s, out=s)
    s += bias
    return s


def scan_leaves(
    qr: np.ndarray,
    centroid: np.ndarray,
    bias: np.ndarray,
    cent_sq: np.ndarray | None,
    leaf_count: np.ndarray,
    search_k: int,
    mean_leaf: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best leaves of each routing query until ``search_k`` items: ragged ``(query, leaf, rank)``.

    Leaf score: ``q . c + bias`` (``bias = w r``, ``-inf`` for empty leaves) for dot/cosine; with
    ``cent_sq = |c|^2`` (euclidean) ``-|q - c| + bias``. Leaves are taken best first while fewer
    than ``search_k`` items have been collected (like Annoy's ``search_k``). Output is sorted by
    query, then rank (0 = best leaf). The leaves above a per-query score threshold are found with
    a compare + ``nonzero`` (the threshold comes from a partition of a strided sample of the
    scores), not with an ``argpartition`` over all leaves; they are ranked with one row-wise
    ``argsort`` of a padded ``(queries, ~1.5 needed leaves)`` matrix (SIMD sort, no global key
    sort); the number of leaves needed is learned block by block (the best leaves are often
    smaller than the mean leaf) and queries whose threshold was too high are redone with lower
    thresholds (:func:`_best_leaves`).

    For dot/cosine the bias is folded into the product (``[q, 1] @ [c, bias].T``: one pass over
    the score buffer less).
    """
    nq = qr.shape[0]
    n_leaf = centroid.shape[0]
    need = search_k / max(mean_leaf, 1.0)
    step = _SAMPLE_STEP if n_leaf >= 8 * _SAMPLE_STEP * max(need, 1.0) else 1
    out_q, out_l, out_r = [], [], []
    finite = np.isfinite(bias)
    n_finite = int(finite.sum())
    if cent_sq is None:
        cent_op = np.concatenate([centroid, bias[:, None]], axis=1)
        q_op = np.concatenate([qr, np.ones((nq, 1), qr.dtype)], axis=1)
    buf = np.empty((min(nq, _SCAN_QUERIES), n_leaf), dtype=np.float32)
    counts = np.asarray(leaf_count, dtype=np.int64)
    for a in range(0, nq, _SCAN_QUERIES):
        b = min(a + _SCAN_QUERIES, nq)
        nb = b - a
        if cent_sq is None:
            s = np.matmul(q_op[a:b], cent_op.T, out=buf[:nb])
        else:
            s = _leaf_scores(qr[a:b], centroid, bias, cent_sq, buf[:nb])
        sub = s[:, ::step]
        w = sub.shape[1]
        r = min(w - 1, int(_THR_MARGIN * need / step) + 4)
        thr = np.partition(sub, w - 1 - r, axis=1)[:, w - 1 - r]
        kr, kc, kl = _best_leaves(s, thr, counts, search_k, n_finite, int(2 * need) + 8)
        # the best leaves are often smaller than the mean leaf: learn the leaves actually needed
        need = max(need, len(kr) / nb)
        out_q.append(kr + a)
        out_l.append(kl)
        out_r.append(kc)
    if not out_q:
        z = np.zeros(0, np.int64)
        return z, z, z
    return (
        np.concatenate(out_q).astype(np.int64),
        np.concatenate(out_l).astype(np.int64),
        np.concatenate(out_r).astype(np.int64),
    )


def _best_leaves(
    s: np.ndarray, thr: np.ndarray, counts: np.ndarray, search_k: int, n_finite: int, retry: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leaves of each row of scores ``s`` taken best first until ``search_k`` items, given a
    per-row threshold ``thr`` expected to pass enough of them: ``(row, rank, leaf)`` sorted by row,
    then rank. Rows whose threshold passed too few items are redone with the exact ``retry``-th best
    score as threshold (``retry`` grows 4x per attempt), never with a full sort."""
    nb, n_leaf = s.shape
    thr = np.where(np.isfinite(thr), thr, np.float32(np.finfo(np.float32).min))
    idx = np.flatnonzero(s >= thr[:, None])
    rows = idx // n_leaf
    cols = idx - rows * n_leaf
    per_row = np.bincount(rows, minlength=nb)
    width = max(int(per_row.max()), 1)
    pos = np.arange(len(idx)) - (np.cumsum(per_row) - per_row)[rows]
    neg = np.full((nb, width), np.inf, dtype=np.float32)  # padded -score, +inf = empty slot
    neg[rows, pos] = -s.ravel()[idx]
    lid = np.zeros((nb, width), dtype=np.int64)
    lid[rows, pos] = cols
    order = np.argsort(neg, axis=1)  # SIMD quicksort per row (deterministic)
    lid = np.take_along_axis(lid, order, axis=1)
    cnt = np.where(np.take_along_axis(neg, order, axis=1) < np.inf, np.take(counts, lid), 0)
    cum = np.cumsum(cnt, axis=1)
    keep = ((cum - cnt) < search_k) & (cnt > 0)
    short = (cum[:, -1] < search_k) & (per_row < n_finite)
    kr, kc = np.nonzero(keep)
    kl = lid[kr, kc]
    if short.any():  # threshold too high for these rows: redo them with a lower one
        keep_row = ~short[kr]
        kr, kc, kl = kr[keep_row], kc[keep_row], kl[keep_row]
        sq = np.flatnonzero(short)
        r = min(n_leaf - 1, retry)
        t2 = np.partition(s[sq], n_leaf - 1 - r, axis=1)[:, n_leaf - 1 - r]
        if r == n_leaf - 1:
            t2 = np.full(len(sq), -np.inf, dtype=np.float32)
        fr, fc, fl = _best_leaves(s[sq], t2, counts, search_k, n_finite, 4 * retry)
        kr = np.concatenate([kr, sq[fr]])
        kc = np.concatenate([kc, fc])
        kl = np.concatenate([kl, fl])
        o = np.lexsort((kc, kr))
        kr, kc, kl = kr[o], kc[o], kl[o]
    return kr, kc, kl


def rerank_matrix(
    vectors: np.ndarray, rows: np.ndarray, row_scale: np.ndarray | None, row_bias: np.ndarray | None
) -> np.ndarray:
    """Rows of the re-rank operand: ``y * scale`` and, with ``row_bias``, a last column ``bias``."""
    v = np.take(vectors, rows, axis=0)
    if row_scale is not None:
        v *= np.take(row_scale, rows)[:, None]
    if row_bias is not None:
        v = np.concatenate([v, np.take(row_bias, rows)[:, None]], axis=1)
    return v


def grouped_rerank(
    q: np.ndarray,
    pair_q: np.ndarray,
    pair_leaf: np.ndarray,
    tau: np.ndarray,
    kill_pair: np.ndarray | None,
    kill_col: np.ndarray | None,
    leaf_start: np.ndarray,
    leaf_count: np.ndarray,
    leaf_items: np.ndarray,
    vectors: np.ndarray,
    row_scale: np.ndarray | None,
    row_bias: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact scores of (query, leaf) pairs, leaf by leaf; return the cells scoring ``>= tau[query]``.

    ``pair_q``/``pair_leaf`` must be grouped by leaf (all pairs of a leaf consecutive; grouping
    leaves of similar sizes together keeps each chunk's padded buffer small). ``q`` is the operand matching
    :func:`rerank_matrix` (with a last column of ones when ``row_bias`` is used). All pairs of one
    leaf are scored with one GEMM against the leaf's vectors, gathered once per chunk of leaves.
    Cells ``(kill_pair, kill_col)`` (pair index, position within the leaf) never survive
    (removed, denied, excluded items). Returns ``(query, item_row, score)`` of the survivors.
    """
    n_pairs = len(pair_q)
    out_q: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    if not n_pairs:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32)
    bounds = np.flatnonzero(np.diff(pair_leaf)) + 1
    g_start = np.concatenate([[0], bounds])
    g_end = np.concatenate([bounds, [n_pairs]])
    g_leaf = pair_leaf[g_start]
    g_cnt = np.take(leaf_count, g_leaf).astype(np.int64)
    n_groups = len(g_start)
    # chunk boundaries: whole leaf groups of about _CELLS score cells (a leaf with more is alone)
    cells = np.cumsum((g_end - g_start) * np.maximum(g_cnt, 1))
    ends = [0]
    while ends[-1] < n_groups:
        base = int(cells[ends[-1] - 1]) if ends[-1] else 0
        ends.append(max(int(np.searchsorted(cells, base + _CELLS, side="right")), ends[-1] + 1))
    most = max(int(g_end[j - 1] - g_start[i]) for i, j in pairwise(ends))
    size = max(int(g_end[j - 1] - g_start[i]) * max(int(g_cnt[i:j].max()), 1) for i, j in pairwise(ends))
    buf_flat = np.empty(size, dtype=np.float32)  # reused: no fresh pages per chunk
    qs_all = np.empty((most, q.shape[1]), dtype=q.dtype)
    for gi, gj in pairwise(ends):
        a, b = int(g_start[gi]), int(g_end[gj - 1])
        qs = np.take(q, pair_q[a:b], axis=0, out=qs_all[: b - a], mode="clip")  # "raise" + out buffers a copy
        cnt = g_cnt[gi:gj]
        rows = np.take(leaf_items, ragged_ranges(np.take(leaf_start, g_leaf[gi:gj]), cnt))
        vm = rerank_matrix(vectors, rows, row_scale, row_bias)
        w = max(int(cnt.max()), 1)  # this chunk's widest leaf (pairs grouped by leaf size: little padding)
        buf = buf_flat[: (b - a) * w].reshape(b - a, w)
        buf.fill(NEG_INF)
        v_off = (np.cumsum(cnt) - cnt).tolist()
        for s0, e0, c, o in zip((g_start[gi:gj] - a).tolist(), (g_end[gi:gj] - a).tolist(), cnt.tolist(), v_off):
            np.matmul(qs[s0:e0], vm[o : o + c].T, out=buf[s0:e0, :c])
        if kill_pair is not None and len(kill_pair):
            lo, hi = np.searchsorted(kill_pair, [a, b])
            if hi > lo:
                buf[kill_pair[lo:hi] - a, kill_col[lo:hi]] = NEG_INF
        t = np.take(tau, pair_q[a:b])  # tau is finite (never -inf): -inf cells never survive
        flat = np.flatnonzero(buf >= t[:, None])
        pr = flat // w
        pc = flat - pr * w
        pl = pair_leaf[a:b][pr]
        out_q.append(pair_q[a:b][pr])
        out_i.append(np.take(leaf_items, np.take(leaf_start, pl) + pc).astype(np.int64))
        out_s.append(buf.ravel()[flat])
    return np.concatenate(out_q), np.concatenate(out_i), np.concatenate(out_s)


def _desc_key(scores: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is descending ``scores`` (float32 bit trick)."""
    b = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    flip = (b >> np.uint32(31)) * np.uint32(0x7FFFFFFF)  # negative: flip all bits, else the sign bit
    flip |= np.uint32(0x80000000)
    asc = b ^ flip
    return np.invert(asc).astype(np.uint64)


def kth_best(qidx: np.ndarray, scores: np.ndarray, nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k``-th best score per query of ragged ``(query, score)`` pairs sorted by query (distinct
    items: one tree). Returns ``(kth (nq,), count (nq,))``; ``kth`` is ``-inf`` where ``count < k``.
    One padded float32 matrix and a row-wise ``np.partition`` (no key sort of all pairs)."""
    per = np.bincount(qidx, minlength=nq)
    width = max(int(per.max()) if nq else 0, k)
    col = np.arange(len(qidx)) - (np.cumsum(per) - per)[qidx]
    m = np.full((nq, width), NEG_INF, dtype=np.float32)
    m[qidx, col] = scores
    return np.partition(m, width - k, axis=1)[:, width - k], per


def topk_ragged(
    qidx: np.ndarray, items: np.ndarray, scores: np.ndarray, nq: int, k: int, copies: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best ``k`` distinct items per query from ragged ``(query, item, score)`` triples.

    ``copies``: the most times one (query, item) can occur (the number of trees). One sort of
    ``query << 32 | descending score`` keys ranks everything; the best ``k * copies`` per query
    are then de-duplicated. Returns ``rows (nq, k)`` (``-1`` where missing), ``scores (nq, k)``
    and the count found.
    """
    out_i = np.full((nq, k), -1, dtype=np.int64)
    out_s = np.full((nq, k), NEG_INF, dtype=np.float32)
    if len(qidx):
        key = (np.asarray(qidx).astype(np.uint64) << np.uint64(32)) | _desc_key(scores)
        o = np.argsort(key)
        qidx, items, scores = qidx[o], items[o], scores[o]
        rank = np.arange(len(qidx)) - np.searchsorted(qidx, qidx)
        top = rank < k * copies
        qidx, items, scores, rank = qidx[top], items[top], scores[top], rank[top]
        if copies > 1:
            o = np.lexsort((items, qidx))
            qs, it = qidx[o], items[o]
            dup = np.zeros(len(o), dtype=bool)
            dup[1:] = (qs[1:] == qs[:-1]) & (it[1:] == it[:-1])
            keep = np.ones(len(o), dtype=bool)
            keep[o[dup]] = False
            qidx, items, scores = qidx[keep], items[keep], scores[keep]
            rank = np.arange(len(qidx)) - np.searchsorted(qidx, qidx)
        top = rank < k
        out_i[qidx[top], rank[top]] = items[top]
        out_s[qidx[top], rank[top]] = scores[top]
    found = (out_i >= 0).sum(axis=1)
    return out_i, out_s, found
