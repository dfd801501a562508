"""Exact solution of the ALS row equations for many rows at once, by degree buckets.

For each row u with streamed items Y_u (d_u x k) and confidence weights w_u = c_u - 1:

    (G + reg I + S_u) x_u = b_u,    S_u = Y_u^T diag(w_u) Y_u,    b_u = Y_u^T (1 + w_u)

Rows are grouped by degree into buckets of similar d (powers of two); each bucket gathers its
factor rows into a zero-padded (n, d_max, k) block, so the S_u come from one batched matrix product
and the systems from one batched LAPACK solve, all in float64. Padding rows point at an appended
zero vector and carry zero weight, so they change nothing. `assemble_rows` returns (S, b) on their
own, so a caller can keep them and update them with the few plays that change (stream fold-in).
"""

from __future__ import annotations

import itertools

import numpy as np

#: Elements of the padded (rows, d_max, k) float64 block built at once (~64 MB).
BLOCK_ELEMENTS = 8_000_000


def assemble_rows(
    indptr: np.ndarray,
    indices: np.ndarray,
    s_weights: np.ndarray,
    b_weights: np.ndarray,
    other: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """S (n_rows, k, k) = sum_j s_w[j] y_j y_j^T and b (n_rows, k) = sum_j b_w[j] y_j per CSR row (float64).

    indptr (n_rows + 1,), indices (nnz,) into `other` (n_other, k); weights (nnz,).
    """
    n_rows = len(indptr) - 1
    k = other.shape[1]
    S = np.zeros((n_rows, k, k), dtype=np.float64)
    b = np.zeros((n_rows, k), dtype=np.float64)
    degree = np.diff(indptr)
    if n_rows == 0 or not degree.any():
        return S, b
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
            S[block], b[block] = _assemble_block(block, d_max, indptr, indices, s_weights, b_weights, padded, zero_row)
    return S, b


def _assemble_block(
    rows: np.ndarray,
    d_max: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    s_weights: np.ndarray,
    b_weights: np.ndarray,
    padded: np.ndarray,
    zero_row: int,
) -> tuple[np.ndarray, np.ndarray]:
    starts = indptr[rows]
    degree = indptr[rows + 1] - starts
    offsets = np.arange(d_max)
    valid = offsets[None, :] < degree[:, None]
    positions = np.where(valid, starts[:, None] + offsets[None, :], 0)
    item = np.where(valid, indices[positions], zero_row)
    ws = np.where(valid, s_weights[positions], 0.0)
    wb = np.where(valid, b_weights[positions], 0.0)
    Y = padded[item].astype(np.float64)  # (n, d_max, k)
    S = np.matmul(np.swapaxes(Y * ws[:, :, None], 1, 2), Y)
    b = np.einsum("ndk,nd->nk", Y, wb)
    return S, b


def add_to_diagonal(A: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A[u] += values[u] * I for every (k, k) matrix of A (n, k, k), in place; returns A."""
    diagonal = np.arange(A.shape[1])
    A[:, diagonal, diagonal] += np.asarray(values, dtype=A.dtype)[:, None]
    return A


def solve_assembled(
    S: np.ndarray, b: np.ndarray, gram_reg: np.ndarray, row_reg: np.ndarray | None = None
) -> np.ndarray:
    """x = (gram_reg + row_reg_u I + S_u)^-1 b_u for every row: (n, k) float32; rows with b = 0 and S = 0
    give 0. row_reg: None, or each row's own lambda (n,) when it varies by row (gram_reg then holds G)."""
    if len(S) == 0:
        return np.zeros((0, gram_reg.shape[0]), dtype=np.float32)
    A = S + gram_reg
    if row_reg is not None:
        add_to_diagonal(A, row_reg)
    return np.linalg.solve(A, b[:, :, None])[:, :, 0].astype(np.float32)


def solve_rows_exact(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray,
    other: np.ndarray,
    gram_reg: np.ndarray,
    row_reg: np.ndarray | None = None,
) -> np.ndarray:
    """Solve every row of a CSR pattern exactly; returns (n_rows, k) float32 (zero for empty rows).

    weights (nnz,) = c - 1; gram_reg (k, k) float64 = other^T other + reg I, or other^T other alone with
    row_reg (n_rows,) each row's lambda.
    """
    weights = np.asarray(weights, dtype=np.float64)
    S, b = assemble_rows(indptr, indices, weights, 1.0 + weights, other)
    out = solve_assembled(S, b, gram_reg, row_reg)
    out[np.diff(indptr) == 0] = 0.0
    return out
