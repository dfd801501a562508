"""Exact scoring primitives: top-K of a score vector, the stored training plays, explanations.

batch.serving (`ServingModel`) answers every query with these.

Scores are `x_u . y_i`; similar tracks rank by the cosine of item vectors; an explanation splits a
score into the contributions of the tracks the user streamed (Hu et al. 2008, section 5).
"""

from __future__ import annotations

import numpy as np

from batch.als import AlsParams
from batch.confidence import confidence_minus_one
from batch.model_store import Model
from batch.solvers import row_regularisation

PLAYS_ARRAYS = ("plays_indptr", "plays_indices", "plays_counts")


def training_plays(model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(indptr, indices, counts) CSR arrays of the counts the model was trained on, memory-mapped;
    None when the store did not keep them."""
    paths = [model.artifact(f"{name}.npy") for name in PLAYS_ARRAYS]
    if not all(p.is_file() for p in paths):
        return None
    indptr, indices, counts = (np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
    return indptr, indices, counts


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best entries of a 1-D score vector, best first.

    exclude: item indices never returned. Returns fewer than k only when fewer candidates exist.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    if exclude is not None and len(exclude):
        scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
    candidates = int(np.isfinite(scores).sum())
    k = min(k, candidates)
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    part = np.argpartition(-scores, k - 1)[:k]
    order = np.argsort(-scores[part], kind="stable")
    best = part[order]
    return best.astype(np.int64), scores[best]


def explain_score(
    item_factors: np.ndarray,
    streamed: np.ndarray,
    counts: np.ndarray,
    item: int,
    params: AlsParams,
    item_ids: np.ndarray,
    top: int = 10,
    gram: np.ndarray | None = None,
) -> dict:
    """Hu et al. section 5 explanation for one (user, item) from the user's streamed items and counts.

    item_factors (n, k) must hold the streamed items and `item`; `gram` is `Y^T Y` over ALL items when
    `item_factors` is only a subset (default: computed from `item_factors`).
    """
    Y = np.asarray(item_factors, dtype=np.float64)
    k = Y.shape[1]
    cm1 = confidence_minus_one(counts, params.alpha, params.confidence, params.eps).astype(np.float64)
    Yu = Y[streamed]
    A = (
        (Y.T @ Y if gram is None else gram)
        + (Yu * cm1[:, None]).T @ Yu
        + float(row_regularisation(params.reg, params.reg_exp, np.array([len(Yu)]))[0]) * np.eye(k)
    )
    weights = np.linalg.solve(A, Yu.T)  # W_u y_j for every streamed j: (k, n_streamed)
    similarity = Y[item] @ weights  # s_ij
    contributions = similarity * (1.0 + cm1)
    order = np.argsort(-contributions, kind="stable")[:top]
    return {
        "track": str(item_ids[item]),
        "score": float(contributions.sum()),
        "contributions": [
            {"track": str(item_ids[streamed[j]]), "contribution": float(contributions[j]), "plays": float(counts[j])}
            for j in order
        ],
    }
