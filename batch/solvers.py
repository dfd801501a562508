"""The ALS half-step: solve every row of one side against the fixed factors of the other side.

For each row u (a user, or a track in the item half-step) with confidence pattern `C_u`:

    (G + lambda I + Y_u^T diag(c_u - 1) Y_u) x_u = Y_u^T c_u        where G = Y^T Y

`Y_u` are the factor rows of the tracks u streamed. Two solvers:

- ``cg``: a few conjugate-gradient steps warm-started from the current `x_u` (implicit's default: 3),
  in float32. Never forms the k x k matrix; costs O(nnz k) per step.
- ``cholesky``: the exact solution of the k x k system per row, assembled and solved in float64
  (O(nnz k^2 + n k^3)). Fold-in uses it so that a folded-in vector equals the half-step solution.

Rows are processed in chunks of consecutive rows (a few thousand non-zeros each) so that the gathered
factor rows stay in cache; chunks run on a thread pool (numpy releases the GIL in these kernels).
Rows without any streams get the zero vector, the exact solution of their equation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import scipy.sparse as sp

try:  # scipy's CSR x dense kernel; private but stable for a decade
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover
    _csr_matvecs = None

Solver = Literal["cg", "cholesky"]
SOLVERS = ("cg", "cholesky")

#: Non-zeros per chunk: the gathered (nnz, k) float32 block stays within a core's L2 cache.
CG_CHUNK_NNZ = 8192
#: The exact solver materialises (nnz, k, k) outer products, so its chunks are smaller.
EXACT_CHUNK_NNZ = 1024
MAX_CHUNK_ROWS = 2048
_TINY = 1e-20


class SolverError(ValueError):
    """Invalid solver arguments."""


def default_threads() -> int:
    """Worker threads for the half-step: `PLAYREC_THREADS` or the number of CPUs."""
    env = os.environ.get("PLAYREC_THREADS")
    if env:
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def row_chunks(indptr: np.ndarray, target_nnz: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """Split rows [0, n) into consecutive ranges holding about `target_nnz` non-zeros each."""
    n_rows = len(indptr) - 1
    start = 0
    while start < n_rows:
        stop = int(np.searchsorted(indptr, indptr[start] + target_nnz, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_rows, n_rows)
        yield start, stop
        start = stop


def _segment_sum(values: np.ndarray, indptr: np.ndarray, n_rows: int) -> np.ndarray:
    """Sum `values` (nnz, ...) over the CSR segments of `indptr` (n_rows + 1); empty rows give zero."""
    out = np.zeros((n_rows, *values.shape[1:]), dtype=values.dtype)
    starts = indptr[:-1]
    nonempty = indptr[1:] > starts
    if values.shape[0]:
        out[nonempty] = np.add.reduceat(values, starts[nonempty], axis=0)
    return out


def _weighted_segment_sum(indptr: np.ndarray, weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`out[u] = sum_{j in segment u} weights[j] * rows[j]`: (n_segments, k) float32.

    indptr: (m + 1,) int32 local offsets; weights: (nnz,) float32; rows: (nnz, k) float32 C-contiguous.
    Uses scipy's CSR x dense kernel directly (the matrix constructor's checks cost more than the
    product at this size).
    """
    m = len(indptr) - 1
    nnz, k = rows.shape
    out = np.zeros((m, k), dtype=np.float32)
    if _csr_matvecs is not None:
        _csr_matvecs(m, nnz, k, indptr, np.arange(nnz, dtype=indptr.dtype), weights, rows.ravel(), out.ravel())
    else:  # pragma: no cover - only if scipy moves its private kernels
        out[:] = sp.csr_matrix((weights, np.arange(nnz), indptr), shape=(m, nnz)) @ rows
    return out


def _cg_chunk(
    indptr: np.ndarray,
    indices: np.ndarray,
    cm1: np.ndarray,
    other: np.ndarray,
    gram_reg: np.ndarray,
    x: np.ndarray,
    steps: int,
) -> np.ndarray:
    """CG steps for one chunk of rows. indptr is local (int32, starts at 0); returns the new x (m, k)."""
    degree = np.diff(indptr)
    empty = degree == 0
    if empty.all():
        return np.zeros_like(x)
    Yg = np.take(other, indices, axis=0)

    def sparse_part(v: np.ndarray) -> np.ndarray:
        d = np.einsum("ij,ij->i", Yg, np.repeat(v, degree, axis=0))
        d *= cm1
        return _weighted_segment_sum(indptr, d, Yg)

    x = x.copy()
    x[empty] = 0.0
    b = _weighted_segment_sum(indptr, cm1 + np.float32(1.0), Yg)
    r = b - x @ gram_reg - sparse_part(x)
    p = r.copy()
    rsold = np.einsum("ij,ij->i", r, r)
    for _ in range(steps):
        live = rsold >= _TINY
        if not live.any():
            break
        Ap = p @ gram_reg + sparse_part(p)
        pAp = np.einsum("ij,ij->i", p, Ap)
        ok = live & (pAp > 0)
        step = np.where(ok, rsold / np.where(ok, pAp, 1.0), 0.0).astype(np.float32)
        x += step[:, None] * p
        r -= step[:, None] * Ap
        rsnew = np.einsum("ij,ij->i", r, r)
        beta = np.where(live, rsnew / np.where(rsold > 0, rsold, 1.0), 0.0).astype(np.float32)
        p = r + beta[:, None] * p
        rsold = np.where(live, rsnew, rsold)
    return x


def _exact_chunk(
    indptr: np.ndarray,
    indices: np.ndarray,
    cm1: np.ndarray,
    other: np.ndarray,
    gram_reg: np.ndarray,
) -> np.ndarray:
    """Exact solution for one chunk of rows, assembled and solved in float64; returns (m, k)."""
    m = len(indptr) - 1
    k = other.shape[1]
    Yg = np.take(other, indices, axis=0).astype(np.float64)
    weights = cm1.astype(np.float64)
    b = _segment_sum(Yg * (weights + 1.0)[:, None], indptr, m)
    if m == 1:
        A = (gram_reg + (Yg * weights[:, None]).T @ Yg)[None]
    else:
        outer = np.einsum("ij,ik->ijk", Yg * weights[:, None], Yg)
        A = _segment_sum(outer, indptr, m) + gram_reg[None]
    out = np.linalg.solve(A, b[:, :, None])[:, :, 0]
    out[np.diff(indptr) == 0] = 0.0
    return out.reshape(m, k).astype(np.float32)


def half_step(
    cm1: sp.csr_matrix,
    other: np.ndarray,
    x: np.ndarray,
    reg: float,
    solver: Solver = "cg",
    cg_steps: int = 3,
    n_threads: int | None = None,
    gram: np.ndarray | None = None,
) -> np.ndarray:
    """Solve all rows of `cm1` against fixed `other` factors.

    cm1: CSR (n_rows, n_other) of `c - 1` (float32, sorted indices; the pattern is the preference).
    other: (n_other, k) float32 fixed factors. x: (n_rows, k) float32 current factors (the CG warm
    start; ignored by the exact solver). gram: optional precomputed `other.T @ other` (k, k).
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
    other = np.ascontiguousarray(other, dtype=np.float32)
    k = other.shape[1]
    if gram is None:
        gram = other.T @ other
    indptr, indices = cm1.indptr, cm1.indices
    if indptr.dtype != np.int32 and indptr[-1] < 2**31:
        indptr = indptr.astype(np.int32)
    data = cm1.data.astype(np.float32, copy=False)
    out = np.empty((cm1.shape[0], k), dtype=np.float32)

    if solver == "cg":
        gram_reg = (gram + reg * np.eye(k)).astype(np.float32)

        def work(bounds: tuple[int, int]) -> None:
            lo, hi = bounds
            s, e = indptr[lo], indptr[hi]
            local = (indptr[lo : hi + 1] - s).astype(np.int32)
            out[lo:hi] = _cg_chunk(local, indices[s:e], data[s:e], other, gram_reg, x[lo:hi], cg_steps)

        chunks = row_chunks(indptr, CG_CHUNK_NNZ, MAX_CHUNK_ROWS)
    else:
        gram_reg64 = gram.astype(np.float64) + reg * np.eye(k)

        def work(bounds: tuple[int, int]) -> None:
            lo, hi = bounds
            s, e = indptr[lo], indptr[hi]
            local = indptr[lo : hi + 1] - s
            out[lo:hi] = _exact_chunk(local, indices[s:e], data[s:e], other, gram_reg64)

        chunks = row_chunks(indptr, EXACT_CHUNK_NNZ, 256)
    _run(work, list(chunks), n_threads)
    return out


def _run(work: Callable[[tuple[int, int]], None], chunks: list[tuple[int, int]], n_threads: int | None) -> None:
    threads = n_threads or default_threads()
    if threads == 1 or len(chunks) == 1:
        for c in chunks:
            work(c)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(work, chunks):
            pass
