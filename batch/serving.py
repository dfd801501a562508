"""The serving model: one model version's recommendations, similar tracks, explanations and popularity
fallback, over the model's catalog plus an overlay of folded-in tracks and take-downs.

Every recommendation playrec answers comes from here: `playrec recommend/similar`, the Python API
(`playrec.ALS`, `playrec.ModelStore`) and the stream worker (`stream.live_model.LiveModel` adds the
stream's fold-in state on top of this class and inherits every query).

Exact or forest search, one rule (`SearchMode`):

- ``"auto"`` (default): score every track exactly (one matrix-vector product) while the catalog
  (model tracks + folded-in tracks) holds at most `EXACT_SCAN_ITEMS` tracks, and query the version's
  hyperplane forests above that (exact scoring costs ~13 us per 1,000 tracks at k = 40 on one core;
  a forest query has ~1.5 ms of fixed cost, so it only pays off on larger catalogs). A version
  without forests is always scored exactly.
- ``"exact"``: always score exactly (the reference; `playrec recommend --exact`).
- ``"forest"``: always use the forests (the version must have them).

Scores are ``x_u . y_i``; similar tracks rank by the cosine of item vectors; an explanation splits a
score into the contributions of the tracks the user streamed (Hu et al. 2008, section 5).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse as sp

from batch.als import AlsParams
from batch.foldin import fold_in
from batch.forests import load_forests
from batch.model_store import Model
from batch.recommend import explain_score, top_k, training_plays
from index import HyperplaneForest

SearchMode = Literal["auto", "exact", "forest"]
SEARCH_MODES: tuple[str, ...] = ("auto", "exact", "forest")
#: "auto" scores catalogs of up to this many tracks exactly, larger ones through the forests.
EXACT_SCAN_ITEMS = 100_000
#: How many of the most-listened tracks are kept for the popularity fallback.
POPULAR_KEPT = 1000
#: Query rows scored exactly at once by `recommend_vectors` (rows x catalog float32 scores).
SCORE_BLOCK_ELEMENTS = 20_000_000


class Scored(NamedTuple):
    """One result: a track id and its score (inner product, cosine, or listeners for popularity)."""

    track: str
    score: float


class UnknownIdError(KeyError):
    """A user or track id that the model (and its overlay) does not know, or a taken-down track."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown id"


class UnknownUserError(UnknownIdError):
    """A user id the model version was not trained on."""


class UnknownTrackError(UnknownIdError):
    """A track neither in the model nor folded in, or one taken down."""


class ServingError(ValueError):
    """The serving model cannot be set up as asked."""


#: (indptr (n_users + 1,), indices (nnz,), counts (nnz,)): the CSR arrays of users x tracks counts.
PlaysArrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def stored_plays(model: Model) -> PlaysArrays | None:
    """The CSR arrays of the counts a stored version was trained on, memory-mapped (shared between
    worker processes, never copied), or None when the store did not keep them."""
    return training_plays(model)


def csr_arrays(matrix: sp.csr_matrix) -> PlaysArrays:
    """The CSR arrays of an in-memory counts matrix (no copy)."""
    return matrix.indptr, matrix.indices, matrix.data


class ServingModel:
    """Queries over one model version + an overlay (folded-in tracks, take-downs).

    model: the version's ids and factors. plays: the CSR arrays of the (n_users, n_items) counts it was
    trained on (to exclude streamed tracks, explain, rank popularity), or None. forests: (dot, cosine) forests over
    its tracks, or None. Mutations (`add_tracks`, `take_down`, `restore`) are serialised by callers;
    reads of the folded-in tracks from other threads take `_lock`.
    """

    def __init__(
        self,
        model: Model,
        plays: PlaysArrays | None = None,
        forests: tuple[HyperplaneForest | None, HyperplaneForest | None] | None = None,
        search: SearchMode = "auto",
        search_k: int | None = None,
        exact_scan_items: int = EXACT_SCAN_ITEMS,
    ) -> None:
        if search not in SEARCH_MODES:
            raise ServingError(f"search must be one of {', '.join(SEARCH_MODES)}, got {search!r}")
        self.model = model
        self.version = model.version
        parameters = model.manifest.get("parameters") or {}
        self.params = AlsParams(**parameters) if parameters else AlsParams(factors=model.factors)
        self.k = model.factors
        self.item_ids = np.asarray(model.item_ids)
        self.item_index = model.item_index
        self.user_index = model.user_index
        self.search = search
        self.search_k = search_k
        self.exact_scan_items = exact_scan_items
        self.dot_index, self.cosine_index = forests if forests is not None else (None, None)
        if search == "forest" and (self.dot_index is None or self.cosine_index is None):
            raise ServingError(f"search='forest' but model {self.version} has no forests (publish it with an index)")
        self.plays = plays
        Y = np.asarray(model.item_factors, dtype=np.float64)
        #: Y^T Y over the model's and the folded-in tracks (k, k) float64; replaced, never mutated.
        self.item_gram = Y.T @ Y
        self._lock = threading.Lock()
        self.new_ids: list[str] = []
        self.new_index: dict[str, int] = {}
        self._new_vectors = np.zeros((64, self.k), dtype=np.float32)
        #: Tracks taken down by an operator: never recommended, listed as similar or popular.
        self.taken_down: set[str] = set()
        self.popular = self._popular_tracks()
        self._item_norms: np.ndarray | None = None

    @classmethod
    def load(
        cls, model: Model, use_index: bool = True, search: SearchMode = "auto", search_k: int | None = None
    ) -> ServingModel:
        """A stored version with its training plays and (when `use_index`) its forests, memory-mapped."""
        forests = load_forests(model.path) if use_index else None
        return cls(model, stored_plays(model), forests, search=search, search_k=search_k)

    # -- ids and vectors ---------------------------------------------------------------------
    def __contains__(self, track: str) -> bool:
        return track in self.item_index or track in self.new_index

    @property
    def n_tracks(self) -> int:
        """Tracks in the catalog: the model's and the folded-in ones."""
        return len(self.item_ids) + len(self.new_ids)

    @property
    def new_vectors(self) -> np.ndarray:
        """(n_new, k) float32 vectors of folded-in tracks."""
        return self._new_vectors[: len(self.new_ids)]

    def item_vector(self, track: str) -> np.ndarray:
        """The (k,) float32 vector of a model or folded-in track."""
        if track in self.item_index:
            return np.asarray(self.model.item_factors[self.item_index[track]], dtype=np.float32)
        if track in self.new_index:
            return self.new_vectors[self.new_index[track]]
        raise UnknownTrackError(f"unknown track {track!r}: not in model {self.version} and not folded in yet")

    def user_row(self, user: str) -> int:
        try:
            return self.user_index[user]
        except KeyError:
            raise UnknownUserError(f"unknown user {user!r}: not in model {self.version}") from None

    def model_user_vector(self, user: str) -> np.ndarray | None:
        """The user's (k,) trained vector, or None for a user the model was not trained on."""
        row = self.user_index.get(user)
        return None if row is None else np.asarray(self.model.user_factors[row], dtype=np.float32)

    def user_plays(self, user: str) -> dict[str, float]:
        """The model user's training counts {track: streams} ({} when the version stores none)."""
        row = self.user_row(user)
        if self.plays is None:
            return {}
        indptr, indices, counts = self.plays
        start, stop = int(indptr[row]), int(indptr[row + 1])
        tracks = self.item_ids[np.asarray(indices[start:stop])].tolist()
        return dict(zip(tracks, np.asarray(counts[start:stop], dtype=np.float64).tolist()))

    def _gather(self, tracks: Iterable[str]) -> tuple[list[str], np.ndarray]:
        """Known tracks among `tracks` (in order, deduplicated) and their vectors (n, k). The folded-in
        ones are read under the lock (another thread may be inserting), so a track is never seen
        indexed before its vector is stored."""
        candidates = list(dict.fromkeys(tracks))
        item_index = self.item_index
        with self._lock:
            new_index = self.new_index
            fresh = {
                t: self._new_vectors[new_index[t]].copy() for t in candidates if t in new_index and t not in item_index
            }
        known = [t for t in candidates if t in item_index or t in fresh]
        if not known:
            return [], np.zeros((0, self.k), dtype=np.float32)
        vectors = np.empty((len(known), self.k), dtype=np.float32)
        model_rows = [(j, item_index[t]) for j, t in enumerate(known) if t in item_index]
        if model_rows:
            pos, rows = zip(*model_rows)
            vectors[list(pos)] = np.asarray(self.model.item_factors)[np.asarray(rows)]
        for j, t in enumerate(known):
            if t in fresh:
                vectors[j] = fresh[t]
        return known, vectors

    # -- the overlay -------------------------------------------------------------------------
    def add_tracks(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Insert (or update) folded-in tracks {track: (k,) vector}: searchable at once."""
        with self._lock:
            _, fresh = self._store_tracks(vectors)
        self._index_tracks(vectors, fresh)

    def _store_tracks(self, vectors: Mapping[str, np.ndarray]) -> tuple[list[tuple[float, np.ndarray]], list[str]]:
        """Store folded-in vectors and update `item_gram` (copy-on-write); the caller holds `_lock`.
        Returns the rank-one changes of the Gram matrix as (weight +-1, vector) and the tracks new here.
        Tracks of the model are skipped: the batch solution wins."""
        gram = self.item_gram.copy()
        changed: list[tuple[float, np.ndarray]] = []
        fresh: list[str] = []
        for track, vector in vectors.items():
            if track in self.item_index:
                continue
            v = np.asarray(vector, dtype=np.float32).reshape(self.k)
            v64 = v.astype(np.float64)
            if track in self.new_index:
                old = self.new_vectors[self.new_index[track]].astype(np.float64)
                gram -= np.outer(old, old)
                changed.append((-1.0, old))
                self._new_vectors[self.new_index[track]] = v
            else:
                if len(self.new_ids) == len(self._new_vectors):
                    self._new_vectors = np.concatenate([self._new_vectors, np.zeros_like(self._new_vectors)])
                self.new_index[track] = len(self.new_ids)
                self.new_ids.append(track)
                self._new_vectors[self.new_index[track]] = v
                fresh.append(track)
            gram += np.outer(v64, v64)
            changed.append((1.0, v64))
        self.item_gram = gram
        return changed, fresh

    def _index_tracks(self, vectors: Mapping[str, np.ndarray], fresh: list[str]) -> None:
        """Put stored folded-in tracks (not taken down) into the forests, replacing older vectors."""
        updated = [t for t in vectors if t in self.new_index and t not in self.taken_down]
        for index in (self.dot_index, self.cosine_index):
            if index is None or not updated:
                continue
            index.remove([t for t in updated if t not in fresh and t in index], missing_ok=True)
            index.add(np.stack([self.new_vectors[self.new_index[t]] for t in updated]), np.array(updated))

    def take_down(self, tracks: Iterable[str]) -> None:
        """Mask tracks (known or not yet known) from every answer until `restore`d."""
        new = [t for t in dict.fromkeys(tracks) if t not in self.taken_down]
        self.taken_down.update(new)
        for index in (self.dot_index, self.cosine_index):
            if index is not None:
                present = [t for t in new if t in index]
                if present:
                    index.remove(present)

    def restore(self, tracks: Iterable[str]) -> None:
        """Undo `take_down`: the tracks are answered again."""
        back = [t for t in dict.fromkeys(tracks) if t in self.taken_down]
        self.taken_down.difference_update(back)
        present = [t for t in back if t in self]
        for index in (self.dot_index, self.cosine_index):
            if index is not None and present:
                missing = [t for t in present if t not in index]
                if missing:
                    index.add(np.stack([self.item_vector(t) for t in missing]), np.array(missing))

    # -- the search rule ---------------------------------------------------------------------
    def uses_forest(self, index: HyperplaneForest | None = None) -> bool:
        """Whether queries go through the forests (see the module docstring for the rule)."""
        index = self.dot_index if index is None else index
        if index is None or self.search == "exact":
            return False
        return self.search == "forest" or self.n_tracks > self.exact_scan_items

    # -- queries -----------------------------------------------------------------------------
    def recommend_vectors(
        self, vectors: np.ndarray, k: int = 10, exclude: Sequence[Iterable[str]] | None = None
    ) -> list[list[Scored]]:
        """Top-k tracks by inner product for each row of `vectors` (n, k), best first; `exclude[i]`: track
        ids never returned for row i (take-downs never are)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.k)
        excludes = [set(e) for e in exclude] if exclude is not None else [set() for _ in range(len(vectors))]
        if len(excludes) != len(vectors):
            raise ServingError(f"{len(vectors)} query vectors but {len(excludes)} exclude lists")
        if self.uses_forest(self.dot_index):
            ids, scores = self.dot_index.query_batch(
                vectors, k=k, search_k=self.search_k, exclude=[list(e) for e in excludes]
            )
            return [_finite(row_ids, row_scores) for row_ids, row_scores in zip(ids, scores)]
        if len(vectors) == 1:
            return [self.recommend_vector(vectors[0], k, excludes[0])]
        Y, N = np.asarray(self.model.item_factors), self.new_vectors
        step = max(1, SCORE_BLOCK_ELEMENTS // max(1, self.n_tracks))
        out: list[list[Scored]] = []
        for start in range(0, len(vectors), step):
            block = vectors[start : start + step]
            scores = block @ Y.T if not len(N) else np.hstack([block @ Y.T, block @ N.T])
            for row, banned in zip(scores, excludes[start : start + step]):
                out.append(self._top(row, k, banned | self.taken_down))
        return out

    def recommend_vector(self, vector: np.ndarray, k: int = 10, exclude: Iterable[str] = ()) -> list[Scored]:
        """Top-k tracks for one user vector (k,) by inner product, never returning `exclude` (nor take-downs);
        the single-query path of `recommend_vectors` (a matrix-vector product; every HTTP request)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(self.k)
        if self.uses_forest(self.dot_index):
            ids, scores = self.dot_index.query(vector, k=k, search_k=self.search_k, exclude=list(exclude))
            return _finite(ids, scores)
        scores = np.asarray(self.model.item_factors) @ vector
        if self.new_ids:
            scores = np.concatenate([scores, self.new_vectors @ vector])
        return self._top(scores, k, set(exclude) | self.taken_down)

    def recommend_users(
        self,
        users: Sequence[str],
        k: int = 10,
        exclude_streamed: bool = True,
        exclude: Sequence[Iterable[str]] | None = None,
    ) -> list[list[Scored]]:
        """Top-k tracks for model users by their trained vectors; the tracks each streamed in training
        are excluded unless asked not to, and `exclude[i]` for user i."""
        rows = [self.user_row(u) for u in users]
        vectors = np.asarray(self.model.user_factors)[np.asarray(rows, dtype=np.int64)]
        banned = [set(self.user_plays(u)) if exclude_streamed else set() for u in users]
        if exclude is not None:
            banned = [b | set(e) for b, e in zip(banned, exclude, strict=True)]
        return self.recommend_vectors(vectors, k, banned)

    def recommend(self, user: str, k: int = 10, exclude_streamed: bool = True) -> list[Scored]:
        """Top-k tracks for one model user (see `recommend_users`)."""
        return self.recommend_users([user], k, exclude_streamed)[0]

    def similar(self, track: str, k: int = 10) -> list[Scored]:
        """Tracks closest to `track` by cosine of item vectors (the track itself excluded)."""
        if track in self.taken_down:
            raise UnknownTrackError(f"track {track!r} is taken down")
        vector = self.item_vector(track)
        if self.uses_forest(self.cosine_index):
            ids, scores = self.cosine_index.query(vector, k=k, search_k=self.search_k, exclude=[track])
            return _finite(ids, scores)
        norm = float(np.linalg.norm(vector))
        if self._item_norms is None:
            self._item_norms = np.linalg.norm(np.asarray(self.model.item_factors), axis=1)
        norms = np.concatenate([self._item_norms, np.linalg.norm(self.new_vectors, axis=1)]) * norm
        dots = np.concatenate([np.asarray(self.model.item_factors) @ vector, self.new_vectors @ vector])
        scores = np.divide(dots, norms, out=np.zeros(len(dots), np.float32), where=norms > 0)
        return self._top(scores, k, {track} | self.taken_down)

    def _top(self, scores: np.ndarray, k: int, exclude: set[str]) -> list[Scored]:
        """Top-k of one score row over the catalog (model tracks, then folded-in ones), skipping `exclude`."""
        n_model = len(self.item_ids)
        banned = [
            self.item_index[t] if t in self.item_index else n_model + self.new_index[t] for t in exclude if t in self
        ]
        idx, best = top_k(scores, k, np.asarray(banned, dtype=np.int64))
        new_ids = self.new_ids
        return [
            Scored(str(self.item_ids[i]) if i < n_model else new_ids[i - n_model], float(s)) for i, s in zip(idx, best)
        ]

    def popular_for(self, k: int = 10, exclude: Iterable[str] = ()) -> list[Scored]:
        """The popularity fallback: most-listened tracks of the training data (score = listeners)."""
        exclude = set(exclude) | self.taken_down
        return list(itertools.islice((Scored(t, float(n)) for t, n in self.popular if t not in exclude), k))

    def fold_in(self, plays: Mapping[str, float]) -> np.ndarray | None:
        """The exact half-step vector (k,) float32 of a listener with these counts {track: streams}
        against the catalog's item factors (batch.foldin); None when no track is known."""
        tracks, vectors = self._gather(t for t, c in plays.items() if c > 0)
        if not tracks:
            return None
        counts = np.array([plays[t] for t in tracks], dtype=np.float32)
        row = sp.csr_matrix((counts, np.arange(len(tracks)), [0, len(tracks)]), shape=(1, len(tracks)))
        return fold_in(row, vectors, self.params, gram=self.item_gram)[0]

    def explain_counts(self, counts: Mapping[str, float], track: str, top: int = 10) -> dict:
        """Contributions of a listener's streamed tracks {track: streams} to `track`'s score (Hu et al.
        section 5): {"track", "score", "contributions": [{"track", "contribution", "plays"}]}, the top
        `top` contributions, largest first; they add up to the score of the exact fold-in vector."""
        if track in self.taken_down:
            raise UnknownTrackError(f"track {track!r} is taken down")
        if track not in self:
            raise UnknownTrackError(f"unknown track {track!r}")
        tracks, vectors = self._gather(t for t, c in counts.items() if c > 0)
        all_vectors = np.vstack([vectors, self.item_vector(track)[None]])
        return explain_score(
            all_vectors,
            np.arange(len(tracks)),
            np.array([counts[t] for t in tracks], np.float64),
            len(tracks),
            self.params,
            np.array([*tracks, track]),
            top,
            gram=self.item_gram,
        )

    def explain(self, user: str, track: str, top: int = 10) -> dict:
        """`explain_counts` for a model user from their training counts."""
        if self.plays is None:
            raise UnknownIdError(f"model {self.version} stores no play counts, so it cannot explain")
        return self.explain_counts(self.user_plays(user), track, top)

    def _popular_tracks(self) -> list[tuple[str, int]]:
        if self.plays is None:
            return []
        listeners = np.bincount(np.asarray(self.plays[1]), minlength=len(self.item_ids))
        order = np.argsort(-listeners, kind="stable")[:POPULAR_KEPT]
        return [(str(self.item_ids[i]), int(listeners[i])) for i in order if listeners[i] > 0]


def _finite(ids: np.ndarray, scores: np.ndarray) -> list[Scored]:
    """A forest answer without its padding ("" ids, infinite scores)."""
    return [Scored(str(t), float(s)) for t, s in zip(ids, scores) if t != "" and np.isfinite(s)]
