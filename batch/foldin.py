"""Fold-in: one exact ALS half-step for a batch of new or changed rows against fixed factors.

These are the stream's workhorse. `fold_in_users` solves the user equation for each row of a
users x tracks play-count matrix (the user's FULL counts) against the model's item factors;
`fold_in_items` solves the item equation for new tracks against the user factors of their listeners.
The solution is exact (direct solve in float64), so a folded-in vector equals the ALS half-step
solution for that row to float32 precision.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from batch.als import AlsParams
from batch.confidence import confidence_matrix
from batch.exact import solve_rows_exact
from batch.solvers import row_regularisation


class FoldInError(ValueError):
    """Fold-in input does not match the model."""


def fold_in(
    plays: sp.csr_matrix,
    fixed_factors: np.ndarray,
    params: AlsParams,
    gram: np.ndarray | None = None,
) -> np.ndarray:
    """Solve many rows at once: plays (n_rows, n_fixed) stream counts -> (n_rows, k) float32 factors.

    fixed_factors: (n_fixed, k) factors of the other side, held fixed. gram: optional cached
    `fixed_factors.T @ fixed_factors` (k, k), which the stream keeps per model version.
    Rows without any streams get the zero vector. With `params.reg_exp` > 0 a row's lambda scales with its
    number of non-zeros here, exactly as in the batch half-step.
    """
    plays = sp.csr_matrix(plays, dtype=np.float32)
    if plays.shape[1] != fixed_factors.shape[0]:
        raise FoldInError(
            f"play counts have {plays.shape[1]} columns but the fixed factors have {fixed_factors.shape[0]} rows"
        )
    plays.eliminate_zeros()
    plays.sort_indices()
    if plays.data.size and plays.data.min() < 0:
        raise FoldInError("play counts must be >= 0")
    cm1 = confidence_matrix(plays, params.alpha, params.confidence, params.eps)
    k = fixed_factors.shape[1]
    if gram is None:
        Y = np.asarray(fixed_factors, dtype=np.float64)
        gram = Y.T @ Y
    gram = np.asarray(gram, dtype=np.float64)
    if params.reg_exp == 0:
        row_reg, gram_reg = None, gram + params.reg * np.eye(k)
    else:  # each row's lambda from its own number of plays, as the batch half-step scales it
        row_reg, gram_reg = row_regularisation(params.reg, params.reg_exp, np.diff(cm1.indptr)), gram
    return solve_rows_exact(cm1.indptr, cm1.indices, cm1.data.astype(np.float64), fixed_factors, gram_reg, row_reg)


def fold_in_users(
    user_plays: sp.csr_matrix, item_factors: np.ndarray, params: AlsParams, gram: np.ndarray | None = None
) -> np.ndarray:
    """User vectors (n_users, k) from their full play counts (n_users, n_items) against item factors."""
    return fold_in(user_plays, item_factors, params, gram)


def fold_in_items(
    item_plays: sp.csr_matrix, user_factors: np.ndarray, params: AlsParams, gram: np.ndarray | None = None
) -> np.ndarray:
    """Track vectors (n_tracks, k) from their listeners' counts (n_tracks, n_users) against user factors."""
    return fold_in(item_plays, user_factors, params, gram)
