"""The ALS half-step: solve every row of one side against the fixed factors of the other side.

For each row u (a user, or a track in the item half-step) with confidence pattern `C_u`:

    (G + lambda_u I + Y_u^T diag(c_u - 1) Y_u) x_u = Y_u^T c_u        where G = Y^T Y

`Y_u` are the factor rows of the tracks u streamed; `lambda_u = reg * n_u ** reg_exp` (`row_regularisation`:
n_u the row's number of non-zeros; reg_exp 0, the default, is Hu et al.'s constant lambda, 1 is ALS-WR's
and Spark's weighted-lambda, Rendle et al. 2021's frequency scaling in between). Two solvers:

- ``cg``: a few conjugate-gradient steps warm-started from the current `x_u` (implicit's default: 3),
  in float32, with implicit's iterates (a row stops once its residual norm is below 1e-20). Never
  forms the k x k matrix (except for the few rows of very high degree); costs O(nnz k) per step.
- ``cholesky``: the exact solution of the k x k system per row, assembled and solved in float64
  (O(nnz k^2 + n k^3)). Fold-in uses it so that a folded-in vector equals the half-step solution.

CG layout (chosen by profiling against implicit's Cython loop; numpy/scipy only): rows are grouped by
degree (sorted, within PAD_RATIO), each group's factor rows are gathered ONCE into a padded
(rows, width, k) block (padding has weight 0) that stays in L2, and every CG step is two batched
matrix-vector products on it (BLAS via np.matmul), `d = Y_u p_u`, `Y_u^T ((c_u - 1) * d)`, plus
`p G` for the whole group; the right-hand side is folded into the first residual pass. The few rows
with more than DENSE_MIN_DEGREE non-zeros build `Y_u^T diag(c_u - 1) Y_u` piece by piece (SYRK)
to bound memory. Groups run on a thread pool, largest first (numpy and BLAS release the GIL), with
BLAS itself limited to one thread (threadpoolctl, when installed) so the cores are not
oversubscribed. Rows without any streams get the zero vector, the exact solution of their equation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import numpy as np
import scipy.sparse as sp

from batch.exact import add_to_diagonal, solve_rows_exact

try:  # optional: keeps BLAS to one thread inside our own thread pool (no oversubscription)
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover
    _threadpool_limits = None

try:  # scipy's CSR x dense kernel; private but stable for a decade
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover
    _csr_matvecs = None

Solver = Literal["cg", "cholesky"]
SOLVERS = ("cg", "cholesky")

#: Padded non-zeros per group of CG rows: the gathered (rows, width, k) float32 block (1.3 MB at
#: k = 40) stays within a core's L2 cache. Measured on the 2-core dev machine: 8192 beat 2048-16384.
CG_CHUNK_NNZ = 8192
#: Non-zeros per work item of the exact solver (batch.exact bounds its own padded blocks).
EXACT_CHUNK_NNZ = 1024
#: At most this many rows per group (rows of degree 1 to 3): bounds the (rows, k) CG vectors.
MAX_CHUNK_ROWS = 2048
#: Rows grouped for the padded batched products have degrees within this ratio of each other
#: (ascending; degrees below 10 are grouped exactly), so padding wastes at most ~10%.
PAD_RATIO = 0.9
#: Up to this padded width the batched products use einsum (cheaper than a BLAS call per row).
_EINSUM_MAX_WIDTH = 4
#: Rows with at least this many non-zeros (the most popular tracks) are solved from their explicit
#: k x k systems, accumulated DENSE_PIECE_NNZ non-zeros at a time, instead of one padded block of
#: degree x k floats: it bounds the temporary memory (5 MB at k = 40) at about the same speed.
DENSE_MIN_DEGREE = 32768
DENSE_PIECE_NNZ = 8192
#: Padded non-zeros per group of dense rows, and the smallest / largest degree in a group.
DENSE_GROUP_NNZ = 8192
DENSE_PAD_RATIO = 0.8
#: With n_threads=None, one worker thread per this many non-zeros (at most one per CPU). Measured on
#: the 2-core dev machine: ML-100K (100K nnz) ran 1.6x slower on 2 threads than on 1.
PARALLEL_MIN_NNZ = 500_000
_TINY = 1e-20


class SolverError(ValueError):
    """Invalid solver arguments."""


def default_threads() -> int:
    """Worker threads for the half-step: `PLAYREC_THREADS` or the number of CPUs."""
    env = os.environ.get("PLAYREC_THREADS")
    if env:
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def row_regularisation(reg: float, reg_exp: float, degree: np.ndarray) -> np.ndarray:
    """lambda per row (float64, shaped like `degree`): `reg * degree ** reg_exp`, 0 for rows without plays.

    degree: each row's number of non-zeros (tracks a user streamed, listeners of a track). Fold-in and the
    stream use the same function, so a folded-in vector stays the exact half-step solution.
    """
    degree = np.asarray(degree, dtype=np.float64)
    if reg_exp == 0:
        return np.where(degree > 0, float(reg), 0.0)
    return float(reg) * np.power(degree, float(reg_exp), where=degree > 0, out=np.zeros_like(degree))


def row_chunks(indptr: np.ndarray, target_nnz: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """Split rows [0, n) into consecutive ranges holding about `target_nnz` non-zeros each."""
    n_rows = len(indptr) - 1
    start = 0
    while start < n_rows:
        stop = int(np.searchsorted(indptr, indptr[start] + target_nnz, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_rows, n_rows)
        yield start, stop
        start = stop


def _spmm(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dense: np.ndarray, out: np.ndarray) -> None:
    """`out += A @ dense` for the CSR `A = (data, indices, indptr)`; out (n_rows, k) float32 C-contiguous.

    Calls scipy's CSR x dense kernel directly: the matrix constructor's checks cost more than the
    product at chunk size. indptr and indices must share one integer dtype.
    """
    n_rows, k = out.shape
    if _csr_matvecs is not None:
        _csr_matvecs(n_rows, dense.shape[0], k, indptr, indices, data, dense.ravel(), out.ravel())
    else:  # pragma: no cover - only if scipy moves its private kernels
        out += sp.csr_matrix((data, indices, indptr), shape=(n_rows, dense.shape[0])) @ dense


def _cg_iterate(
    x: np.ndarray,
    r: np.ndarray,
    steps: int,
    apply: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """`steps` CG steps for a batch of independent rows, in place on `x` (m, k); `r` = b - A x.

    `apply(p)` returns `A p` row by row (a new (m, k) array). Like implicit, a row whose residual
    norm drops below 1e-20 stops moving.
    """
    p = r.copy()
    rsold = np.einsum("ij,ij->i", r, r)
    live = rsold >= _TINY
    all_live = bool(live.all())
    if not all_live:
        if not live.any():
            return x
        p[~live] = 0.0  # a row that starts converged is left as it is (A 0 = 0: it never moves)
    tmp = np.empty_like(x)
    for step_no in range(steps):
        Ap = apply(p)
        pAp = np.einsum("ij,ij->i", p, Ap)
        if all_live and pAp.min() > 0:
            step = rsold / pAp
        else:
            step = np.divide(rsold, pAp, out=np.zeros_like(rsold), where=live & (pAp > 0))
        x += np.multiply(p, step[:, None], out=tmp)
        if step_no == steps - 1:
            break
        r -= np.multiply(Ap, step[:, None], out=tmp)
        rsnew = np.einsum("ij,ij->i", r, r)
        if all_live and rsnew.min() >= _TINY:
            beta = rsnew / rsold
        else:
            all_live = False
            live &= rsnew >= _TINY
            if not live.any():
                break
            beta = np.divide(rsnew, rsold, out=np.zeros_like(rsold), where=live)
        p *= beta[:, None]
        p += r
        rsold = rsnew
    return x


def _cg_padded(
    indptr: np.ndarray,
    indices: np.ndarray,
    cm1: np.ndarray,
    rows: np.ndarray,
    other: np.ndarray,
    gram_reg: np.ndarray,
    x: np.ndarray,
    steps: int,
    row_reg: np.ndarray | None = None,
) -> np.ndarray:
    """CG steps for a group of rows of similar degree, in the sparse form; returns their new x (h, k).

    gram_reg: G + reg I (k, k) float32; row_reg: None, or the rows' own lambda (h,) float32 when it
    varies by row (then gram_reg is G alone).

    The factor rows of each row's non-zeros are gathered once into a (h, width, k) block, padded to
    the group's largest degree with weight-0 entries; `A p = G p + Y_u^T diag(c_u - 1) Y_u p` is then
    two batched matrix-vector products per step (BLAS), without forming the k x k matrices.
    """
    h, k = len(rows), other.shape[1]
    starts = indptr.take(rows)
    degree = indptr.take(rows + 1) - starts
    width = int(degree.max())
    offsets = np.arange(width, dtype=starts.dtype)
    if int(degree.min()) == width:
        pos = starts[:, None] + offsets
        conf = cm1.take(pos)
        pref = None
    else:
        valid = offsets < degree[:, None]
        pos = starts[:, None] + np.minimum(offsets, degree[:, None] - 1)
        conf = np.where(valid, cm1.take(pos), np.float32(0.0))
        pref = valid.astype(np.float32)
    Y3 = np.take(other, indices.take(pos.ravel()), axis=0).reshape(h, width, k)
    small = width <= _EINSUM_MAX_WIDTH

    def rowdot(v: np.ndarray) -> np.ndarray:  # (h, width): y_j . v_u
        if small:
            return np.einsum("hdk,hk->hd", Y3, v)
        return np.matmul(Y3, v[:, :, None])[:, :, 0]

    def combine(weights: np.ndarray, out: np.ndarray) -> np.ndarray:  # out += sum_j weights_j y_j
        if small:
            out += np.einsum("hd,hdk->hk", weights, Y3)
        else:
            out += np.matmul(weights[:, None, :], Y3)[:, 0, :]
        return out

    def regularised(v: np.ndarray) -> np.ndarray:  # (G + lambda_u I) v_u, a new array
        out = v @ gram_reg
        if row_reg is not None:
            out += row_reg[:, None] * v
        return out

    def apply(v: np.ndarray) -> np.ndarray:
        d = rowdot(v)
        d *= conf
        return combine(d, regularised(v))

    x = x.copy()
    # r = b - A x with b = Y_u^T c_u in one pass: weights c - (c - 1) (y . x) on the real entries
    d = rowdot(x)
    d *= conf
    np.subtract(conf + (np.float32(1.0) if pref is None else pref), d, out=d)
    r = combine(d, -regularised(x))
    return _cg_iterate(x, r, steps, apply)


def _cg_dense(
    indptr: np.ndarray,
    indices: np.ndarray,
    cm1: np.ndarray,
    rows: np.ndarray,
    other: np.ndarray,
    gram_reg: np.ndarray,
    x: np.ndarray,
    steps: int,
    row_reg: np.ndarray | None = None,
) -> np.ndarray:
    """CG steps for a group of rows with very many non-zeros each, from their k x k systems.

    rows: (h,) row numbers into the global `indptr`; x: their (h, k) current factors. Builds
    `G + lambda I + Y_u^T diag(c_u - 1) Y_u` DENSE_PIECE_NNZ non-zeros at a time (gather and scale in
    one pass with scipy's CSR kernel, then one SYRK per row when all weights are >= 0), so memory
    stays bounded however popular a track is; the CG steps then cost k^2 per row. Same CG iterates
    as the padded form. Rows are padded to the group's largest degree (padding rows stay zero).
    """
    h, k = len(rows), other.shape[1]
    starts = indptr[rows].astype(np.int64)
    degree = indptr[rows + 1].astype(np.int64) - starts
    width = int(degree.max())
    # the group's non-zeros, row after row
    if h == 1:
        pos = slice(int(starts[0]), int(starts[0] + degree[0]))
    else:
        offsets = np.zeros(h, dtype=np.int64)
        np.cumsum(degree[:-1], out=offsets[1:])
        pos = np.arange(int(degree.sum()), dtype=np.int64) + np.repeat(starts - offsets, degree)
    cols = indices[pos].astype(np.int32, copy=False)
    weights = cm1[pos]
    b_indptr = np.zeros(h + 1, dtype=np.int32)
    np.cumsum(degree, out=b_indptr[1:])
    b = np.zeros((h, k), dtype=np.float32)
    _spmm(b_indptr, cols, weights + np.float32(1.0), other, b)
    S = np.zeros((h, k, k), dtype=np.float32)
    signed = bool((weights < 0).any())
    scale = weights if signed else np.sqrt(weights)
    piece = max(1, DENSE_PIECE_NNZ // h)
    for lo in range(0, width, piece):
        hi = min(width, lo + piece)
        # padded (h, hi - lo) block as a CSR with at most one entry per row: padding rows stay zero
        valid = (np.arange(lo, hi)[None, :] < degree[:, None]).ravel()
        p_indptr = np.zeros(valid.size + 1, dtype=np.int32)
        np.cumsum(valid, out=p_indptr[1:])
        take = (b_indptr[:-1, None] + np.arange(lo, hi, dtype=np.int32)[None, :]).ravel()[valid]
        Z = np.zeros((h, hi - lo, k), dtype=np.float32)
        _spmm(p_indptr, cols[take], scale[take], other, Z.reshape(-1, k))
        if signed:  # weights of both signs: Y^T diag(w) Y as a general product
            Yp = np.zeros_like(Z)
            _spmm(p_indptr, cols[take], np.ones(take.size, np.float32), other, Yp.reshape(-1, k))
            S += np.matmul(Z.transpose(0, 2, 1), Yp)
        else:  # Z^T Z with Z = diag(sqrt(w)) Y: numpy hands it to SYRK
            S += np.matmul(Z.transpose(0, 2, 1), Z)
    S += gram_reg
    if row_reg is not None:
        add_to_diagonal(S, row_reg)
    x = x.copy()

    def apply(v: np.ndarray) -> np.ndarray:
        return np.matmul(S, v[:, :, None])[:, :, 0]

    r = b - apply(x)
    return _cg_iterate(x, r, steps, apply)


def _dense_groups(rows: np.ndarray, degree: np.ndarray) -> list[np.ndarray]:
    """Group the dense rows by similar degree (largest first) for padded batched BLAS calls."""
    if rows.size == 0:
        return []
    rows = rows[np.argsort(-degree[rows], kind="stable")]
    deg = degree[rows]
    groups = []
    start = 0
    while start < rows.size:
        top = int(deg[start])
        # rows whose degree is within DENSE_PAD_RATIO of the first, and the padded block bounded
        limit = max(1, min(DENSE_GROUP_NNZ // top, MAX_CHUNK_ROWS))
        stop = int(np.searchsorted(-deg, -top * DENSE_PAD_RATIO, side="right"))
        stop = min(max(stop, start + 1), start + limit)
        groups.append(rows[start:stop])
        start = stop
    return groups


def _dense_work(indptr, indices, data, rows, other, gram_reg, x, out, steps, row_reg) -> None:
    rr = None if row_reg is None else row_reg[rows]
    out[rows] = _cg_dense(indptr, indices, data, rows, other, gram_reg, x[rows], steps, rr)


def half_step(
    cm1: sp.csr_matrix,
    other: np.ndarray,
    x: np.ndarray,
    reg: float,
    solver: Solver = "cg",
    cg_steps: int = 3,
    n_threads: int | None = None,
    gram: np.ndarray | None = None,
    reg_exp: float = 0.0,
) -> np.ndarray:
    """Solve all rows of `cm1` against fixed `other` factors.

    cm1: CSR (n_rows, n_other) of `c - 1` (float32, sorted indices; the pattern is the preference).
    other: (n_other, k) float32 fixed factors. x: (n_rows, k) float32 current factors (the CG warm
    start; ignored by the exact solver). gram: optional precomputed `other.T @ other` (k, k).
    reg, reg_exp: row u's lambda is `reg * n_u ** reg_exp` (`row_regularisation`; n_u = its non-zeros).
    n_threads: worker threads; None = one per PARALLEL_MIN_NNZ non-zeros, at most `default_threads()`.
    Returns the new (n_rows, k) float32 factors (a new array; `x` is not modified).
    """
    if solver not in SOLVERS:
        raise SolverError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if cm1.shape[1] != other.shape[0]:
        raise SolverError(f"confidence matrix has {cm1.shape[1]} columns but other side has {other.shape[0]} rows")
    if x.shape != (cm1.shape[0], other.shape[1]):
        raise SolverError(f"x must be shaped {(cm1.shape[0], other.shape[1])}, got {x.shape}")
    if cg_steps < 1:
        raise SolverError(f"cg_steps must be >= 1, got {cg_steps}")
    with single_threaded_blas():
        return _half_step(cm1, other, x, reg, solver, cg_steps, n_threads, gram, reg_exp)


def _half_step(cm1, other, x, reg, solver, cg_steps, n_threads, gram, reg_exp) -> np.ndarray:
    other = np.ascontiguousarray(other, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    k = other.shape[1]
    if gram is None:
        gram = other.T @ other
    indptr, indices = cm1.indptr, cm1.indices
    if indptr.dtype != np.int32 and indptr[-1] < 2**31:
        indptr = indptr.astype(np.int32)
    data = cm1.data.astype(np.float32, copy=False)
    out = np.empty((cm1.shape[0], k), dtype=np.float32)
    degree = np.diff(indptr)
    # a constant lambda goes into the shared G + lambda I; a per-row one is added row by row
    row_reg = None if reg_exp == 0 else row_regularisation(reg, reg_exp, degree)
    base_reg = reg if row_reg is None else 0.0

    if solver == "cg":
        gram_reg = (gram + base_reg * np.eye(k)).astype(np.float32)
        rr = None if row_reg is None else row_reg.astype(np.float32)
        dense = degree >= DENSE_MIN_DEGREE
        out[degree == 0] = 0.0
        work_items: list[Callable[[], None]] = [
            partial(_dense_work, indptr, indices, data, rows, other, gram_reg, x, out, cg_steps, rr)
            for rows in _dense_groups(np.flatnonzero(dense), degree)
        ]
        work_items += [
            partial(_padded_work, indptr, indices, data, rows, other, gram_reg, x, out, cg_steps, rr)
            for rows in reversed(_padded_groups(np.flatnonzero(~dense & (degree > 0)), degree))
        ]
    else:
        gram_reg64 = gram.astype(np.float64) + base_reg * np.eye(k)
        work_items = [
            partial(_exact_work, indptr, indices, data, other, gram_reg64, out, lo, hi, row_reg)
            for lo, hi in row_chunks(indptr, EXACT_CHUNK_NNZ, 256)
        ]
    if n_threads is None:  # small problems: a pool's GIL hand-offs cost more than a second core gains
        n_threads = max(1, min(default_threads(), cm1.nnz // PARALLEL_MIN_NNZ))
    _run(work_items, n_threads)
    return out


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while the half-step runs: its products are small and our thread pool
    already uses every core; a multi-threaded BLAS underneath oversubscribes them (many times slower)."""
    if _threadpool_limits is None:  # pragma: no cover - threadpoolctl not installed
        return contextlib.nullcontext()
    return _threadpool_limits(limits=1, user_api="blas")


def _padded_groups(rows: np.ndarray, degree: np.ndarray) -> list[np.ndarray]:
    """Group rows by degree (ascending) for padded blocks of at most CG_CHUNK_NNZ entries.

    A group holds rows whose degrees are within PAD_RATIO of each other (padding wastes at most
    ~10%); a group that would hold fewer than a quarter of CG_CHUNK_NNZ real entries (sparse stretch
    of the degree distribution) is extended while its padded block stays within half of it, since
    per-group overhead then costs more than the padding.
    """
    if rows.size == 0:
        return []
    rows = rows[np.argsort(degree[rows], kind="stable")]
    deg = degree[rows].astype(np.int64)
    n = rows.size
    groups = []
    start = 0
    while start < n:
        low = int(deg[start])
        stop = int(np.searchsorted(deg, int(low / PAD_RATIO), side="right"))
        width = int(deg[stop - 1])
        stop = min(stop, start + max(1, CG_CHUNK_NNZ // width), start + MAX_CHUNK_ROWS)
        if int(deg[start:stop].sum()) < CG_CHUNK_NNZ // 4 and stop < n:
            span = min(n, start + max(1, (CG_CHUNK_NNZ // 2) // low))
            padded = np.arange(1, span - start + 1) * deg[start:span]
            stop = max(stop, start + int(np.searchsorted(padded, CG_CHUNK_NNZ // 2, side="right")))
        groups.append(rows[start:stop])
        start = stop
    return groups


def _padded_work(indptr, indices, data, rows, other, gram_reg, x, out, steps, row_reg) -> None:
    rr = None if row_reg is None else row_reg[rows]
    out[rows] = _cg_padded(indptr, indices, data, rows, other, gram_reg, x[rows], steps, rr)


def _exact_work(indptr, indices, data, other, gram_reg64, out, lo, hi, row_reg) -> None:
    s, e = indptr[lo], indptr[hi]
    rr = None if row_reg is None else row_reg[lo:hi]
    out[lo:hi] = solve_rows_exact(indptr[lo : hi + 1] - s, indices[s:e], data[s:e], other, gram_reg64, rr)


def _run(work_items: list[Callable[[], None]], n_threads: int | None) -> None:
    """Run the work items (largest first as listed) on a thread pool; numpy and BLAS release the GIL."""
    threads = n_threads or default_threads()
    if threads == 1 or len(work_items) <= 1:
        for item in work_items:
            item()
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(work_items))) as pool:
        for _ in pool.map(lambda item: item(), work_items):
            pass
