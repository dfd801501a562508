"""Confidence weights of implicit feedback (Hu, Koren & Volinsky 2008, section 4).

`c = 1 + alpha * plays` (linear) or `c = 1 + alpha * log(1 + plays / eps)` (log). The solvers work with
`c - 1`, which is zero wherever the user did not stream the track, so it stays sparse.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

ConfidenceKind = Literal["linear", "log"]
CONFIDENCE_KINDS = ("linear", "log")


class ConfidenceError(ValueError):
    """Invalid confidence parameters."""


def confidence_minus_one(plays: np.ndarray, alpha: float, kind: ConfidenceKind = "log", eps: float = 1.0) -> np.ndarray:
    """`c - 1` for an array of stream counts (any shape), float32."""
    if alpha <= 0 or not np.isfinite(alpha):
        raise ConfidenceError(f"alpha must be a positive number, got {alpha}")
    plays = np.asarray(plays, dtype=np.float64)
    if kind == "linear":
        out = alpha * plays
    elif kind == "log":
        if eps <= 0:
            raise ConfidenceError(f"eps must be positive for log confidence, got {eps}")
        out = alpha * np.log1p(plays / eps)
    else:
        raise ConfidenceError(f"unknown confidence {kind!r}; choose one of {', '.join(CONFIDENCE_KINDS)}")
    return out.astype(np.float32)


def confidence_matrix(
    plays: sp.csr_matrix, alpha: float, kind: ConfidenceKind = "log", eps: float = 1.0
) -> sp.csr_matrix:
    """CSR of `c - 1` with the sparsity pattern of `plays` (users x tracks, float32)."""
    plays = sp.csr_matrix(plays)
    out = sp.csr_matrix(
        (confidence_minus_one(plays.data, alpha, kind, eps), plays.indices.copy(), plays.indptr.copy()),
        shape=plays.shape,
    )
    out.sort_indices()
    return out
