"""Exact solution of the ALS row equations for many rows at once, by degree buckets.

For each row u with streamed items Y_u (d_u x k) and confidence weights w_u = c_u - 1:

    (G + reg I + Y_u^T diag(w_u) Y_u) x_u = Y_u^T (1 + w_u)

Rows are grouped by degree into buckets of similar d (powers of two); each bucket gathers its
factor rows into a zero-padded (n, d_max, k) block, so the k x k matrices come from one batched
matrix product and the systems from one batched LAPACK solve, all in float64. Padding rows point
at an appended zero vector and carry zero weight, so they change nothing.
"""

from __future__ import annotations

import itertools

import numpy as np

#: Elements of the padded (rows, d_max, k) float64 block built at once (~64 MB).
BLOCK_ELEMENTS = 8_000_000


def solve_rows_exact(
    indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, other: np.ndarray, gram_reg: np.ndarray
) -> np.ndarray:
    """Solve every row of a CSR pattern exactly; returns (n_rows, k) float32 (zero for empty rows).

    indptr (n_rows + 1,), indices (nnz,) into `other` (n_other, k); weights (nnz,) = c - 1;
    gram_reg (k, k) float64 = other^T other + reg I.
    """
    n_rows = len(indptr) - 1
    k = other.shape[1]
    out = np.zeros((n_rows, k), dtype=np.float32)
    degree = np.diff(indptr)
    if n_rows == 0 or not degree.any():
        return out
    padded = np.vstack([np.asarray(other, dtype=np.float32), np.zeros((1, k), dtype=np.float32)])
    zero_row = len(padded) - 1
    buckets = np.ceil(np.log2(np.maximum(degree, 1))).astype(np.int64)
    buckets[degree == 0] = -1
    order = np.argsort(buckets, kind="stable")
    edges = np.searchsorted(buckets[order], np.unique(buckets[buckets >= 0]), side="left")
    edges = np.append(edges, n_rows)
    for lo, hi in itertools.pairwise(edges):
        rows = order[lo:hi]
        d_max = int(degree[rows].max())
        step = max(1, BLOCK_ELEMENTS // (d_max * k))
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            out[block] = _solve_block(block, d_max, indptr, indices, weights, padded, zero_row, gram_reg)
    return out


def _solve_block(
    rows: np.ndarray,
    d_max: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray,
    padded: np.ndarray,
    zero_row: int,
    gram_reg: np.ndarray,
) -> np.ndarray:
    starts = indptr[rows]
    degree = indptr[rows + 1] - starts
    offsets = np.arange(d_max)
    valid = offsets[None, :] < degree[:, None]
    positions = np.where(valid, starts[:, None] + offsets[None, :], 0)
    item = np.where(valid, indices[positions], zero_row)
    w = np.where(valid, weights[positions], 0.0)
    Y = padded[item].astype(np.float64)  # (n, d_max, k)
    A = np.matmul(np.swapaxes(Y * w[:, :, None], 1, 2), Y)
    A += gram_reg
    b = np.einsum("ndk,nd->nk", Y, (1.0 + w) * valid)
    return np.linalg.solve(A, b[:, :, None])[:, :, 0]
