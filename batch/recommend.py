"""Exact scoring against a model: top-K for a user or a vector, similar tracks, explanations.

Scores are `x_u . y_i`; similar tracks rank by the cosine of item vectors; an explanation splits a
score into the contributions of the tracks the user streamed (Hu et al. 2008, section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from batch.als import AlsParams
from batch.confidence import confidence_minus_one
from batch.forests import load_forests
from batch.model_store import Model

PLAYS_ARRAYS = ("plays_indptr", "plays_indices", "plays_counts")


def training_plays(model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(indptr, indices, counts) CSR arrays of the counts the model was trained on, memory-mapped;
    None when the store did not keep them."""
    paths = [model.artifact(f"{name}.npy") for name in PLAYS_ARRAYS]
    if not all(p.is_file() for p in paths):
        return None
    indptr, indices, counts = (np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
    return indptr, indices, counts


class UnknownIdError(KeyError):
    """A user or track id that the model does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown id"


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


@dataclass
class Recommendation:
    track: str
    score: float


class Recommender:
    """Recommendations from one model version by exact scoring.

    Later layers pass in an index (the hyperplane forest) for approximate search; exact scoring stays
    the reference. The model's training plays (if stored) exclude streamed tracks and feed explanations.
    """

    def __init__(self, model: Model, use_index: bool = True, search_k: int | None = None) -> None:
        self.model = model
        self.search_k = search_k
        self.dot_index, self.cosine_index = load_forests(model.path) if use_index else (None, None)
        self.params = (
            AlsParams(**model.manifest.get("parameters", {}))
            if model.manifest.get("parameters")
            else AlsParams(factors=model.factors)
        )
        self._plays: sp.csr_matrix | None = None
        self._item_unit: np.ndarray | None = None

    # -- lookups -----------------------------------------------------------------------------
    def user_row(self, user: str) -> int:
        try:
            return self.model.user_index[user]
        except KeyError:
            raise UnknownIdError(f"unknown user {user!r}: not in model {self.model.version}") from None

    def item_row(self, track: str) -> int:
        try:
            return self.model.item_index[track]
        except KeyError:
            raise UnknownIdError(f"unknown track {track!r}: not in model {self.model.version}") from None

    @property
    def plays(self) -> sp.csr_matrix | None:
        """The users x tracks counts the model was trained on, when the store kept them."""
        if self._plays is None:
            arrays = training_plays(self.model)
            if arrays is None:
                return None
            indptr, indices, counts = arrays
            shape = (len(self.model.user_ids), len(self.model.item_ids))
            self._plays = sp.csr_matrix((counts, indices, indptr), shape=shape)
        return self._plays

    def streamed(self, row: int) -> np.ndarray:
        """Item indices the user (model row) streamed in the training data."""
        plays = self.plays
        if plays is None:
            return np.empty(0, dtype=np.int64)
        return np.asarray(plays.indices[plays.indptr[row] : plays.indptr[row + 1]], dtype=np.int64)

    # -- queries -----------------------------------------------------------------------------
    def recommend_vector(
        self, vector: np.ndarray, k: int = 10, exclude: np.ndarray | None = None
    ) -> list[Recommendation]:
        """Top-k tracks for a user vector (k,) by inner product, excluding item indices `exclude`.

        Uses the model's inner-product forest when it has one, exact scoring otherwise.
        """
        if self.dot_index is not None:
            banned = [] if exclude is None else self.model.item_ids[np.asarray(exclude, dtype=np.int64)].tolist()
            ids, scores = self.dot_index.query(
                np.asarray(vector, np.float32), k=k, search_k=self.search_k, exclude=banned
            )
            return [Recommendation(str(t), float(s)) for t, s in zip(ids, scores) if t != "" and np.isfinite(s)]
        scores = np.asarray(self.model.item_factors) @ np.asarray(vector, dtype=np.float32)
        idx, best = top_k(scores, k, exclude)
        return [Recommendation(str(self.model.item_ids[i]), float(s)) for i, s in zip(idx, best, strict=True)]

    def recommend(self, user: str, k: int = 10, exclude_streamed: bool = True) -> list[Recommendation]:
        """Top-k tracks for a known user; tracks the user streamed are excluded unless asked not to."""
        row = self.user_row(user)
        exclude = self.streamed(row) if exclude_streamed else None
        return self.recommend_vector(self.model.user_factors[row], k, exclude)

    def similar(self, track: str, k: int = 10) -> list[Recommendation]:
        """The k tracks most similar to `track` by cosine of item vectors (the track itself excluded)."""
        row = self.item_row(track)
        if self.cosine_index is not None:
            ids, scores = self.cosine_index.query(
                np.asarray(self.model.item_factors[row], np.float32), k=k, search_k=self.search_k, exclude=[track]
            )
            return [Recommendation(str(t), float(s)) for t, s in zip(ids, scores) if t != "" and np.isfinite(s)]
        unit = self.item_unit
        idx, best = top_k(unit @ unit[row], k, np.array([row]))
        return [Recommendation(str(self.model.item_ids[i]), float(s)) for i, s in zip(idx, best, strict=True)]

    @property
    def item_unit(self) -> np.ndarray:
        """Item vectors scaled to unit length (zero vectors stay zero): (n_items, k) float32."""
        if self._item_unit is None:
            Y = np.asarray(self.model.item_factors, dtype=np.float32)
            norms = np.linalg.norm(Y, axis=1, keepdims=True)
            self._item_unit = np.divide(Y, norms, out=np.zeros_like(Y), where=norms > 0)
        return self._item_unit

    def explain(self, user: str, track: str, top: int = 10) -> dict:
        """Why `track` scores as it does for `user`: contributions of the user's streamed tracks.

        With `W_u = (Y^T C_u Y + reg I)^-1`, track j contributes `s_ij c_uj` where `s_ij = y_i^T W_u y_j`;
        the contributions add up to the score of the exact half-step user vector.
        """
        row, item = self.user_row(user), self.item_row(track)
        plays = self.plays
        if plays is None:
            raise UnknownIdError(f"model {self.model.version} stores no play counts, so it cannot explain")
        start, stop = plays.indptr[row], plays.indptr[row + 1]
        streamed = np.asarray(plays.indices[start:stop], dtype=np.int64)
        counts = np.asarray(plays.data[start:stop], dtype=np.float64)
        return explain_score(
            np.asarray(self.model.item_factors), streamed, counts, item, self.params, self.model.item_ids, top
        )


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
    A = (Y.T @ Y if gram is None else gram) + (Yu * cm1[:, None]).T @ Yu + params.reg * np.eye(k)
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
