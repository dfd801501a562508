"""The speed layer's view of one model version plus what the stream folded in on top of it.

A `LiveModel` wraps a published `Model` (memory-mapped, shared between worker processes) and adds:

- exact fold-in of users from their full play counts (`fold_in_users`), batched across users,
  against the model's item factors and the tracks folded in since;
- exact fold-in of new tracks from their listeners' current vectors (`fold_in_tracks`), and their
  insertion into the search index so they become recommendable without a retrain;
- and, from `batch.serving.ServingModel` (the one serving model, which it extends), every query: top-K,
  similar tracks, popularity fallback and explanations over model + new tracks, minus take-downs.

It holds no Kafka state: the faust worker feeds it counts and vectors from its tables.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from batch.confidence import confidence_minus_one
from batch.exact import add_to_diagonal, assemble_rows
from batch.foldin import fold_in
from batch.forests import load_forests
from batch.history import history_arrays
from batch.model_store import Model
from batch.serving import EXACT_SCAN_ITEMS, Scored, ServingModel, UnknownTrackError, stored_plays
from batch.solvers import row_regularisation
from index.search import ragged_ranges

__all__ = ["EXACT_SCAN_ITEMS", "LiveModel", "Scored", "UnknownTrackError", "UserChange"]

log = logging.getLogger(__name__)

#: Users whose training counts are kept decoded in memory (the stream's active users).
TRAINING_CACHE_USERS = 100_000
#: Cached users whose systems are updated and solved together (256 x 13 KB at k = 40: fits the CPU cache).
FOLD_CHUNK_USERS = 256
#: Changes of the item Gram matrix (new or re-solved tracks) a cached inverse catches up with by rank-one
#: updates; a user cached before more changes than this is rebuilt from their full counts instead.
GRAM_LOG_MAX = 64
#: Rebuilt users with at most this many known tracks get their inverse from (G + reg I)^-1 by Sherman-Morrison
#: steps (a few us each, vectorised over users) instead of a LAPACK inverse (~28 us per user at k = 40).
SM_BUILD_TRACKS = 24
#: Rank-one updates of one cached inverse before it is rebuilt from the user's full counts (bounds the
#: rounding that Sherman-Morrison updates accumulate; each adds ~1e-16 x the system's condition number).
REFRESH_UPDATES = 2000


def _rank_one_updates(
    P: np.ndarray, sel: slice | np.ndarray, y: np.ndarray, weight: float | np.ndarray, scratch: np.ndarray
) -> None:
    """Sherman-Morrison, one rank-one change per selected matrix: ``P[i] <- (P[i]^-1 + w_i y_i y_i^T)^-1``.

    P (n, k, k) float64 symmetric inverses, updated in place; ``sel`` a slice (a view, no copy) or row
    indices; y (m, k) one vector per selected matrix; weight a scalar or (m,); scratch >= (m, k, k).
    Exact for any weight that keeps the matrix positive definite (``1 + w y^T P y > 0``).
    """
    Ps = P[sel]
    m = len(Ps)
    if not m:
        return
    u = np.matmul(Ps, y[:, :, None])[:, :, 0]  # P y (P symmetric: also y^T P)
    w = np.broadcast_to(np.asarray(weight, dtype=np.float64), (m,))
    coef = w / (1.0 + w * np.einsum("nk,nk->n", y, u))
    t = np.multiply((u * coef[:, None])[:, :, None], u[:, None, :], out=scratch[:m])  # one pass over (m, k, k)
    if isinstance(sel, slice):
        Ps -= t
    else:
        P[sel] = Ps - t


def _apply_plays(
    P: np.ndarray,
    b: np.ndarray,
    degree: np.ndarray,
    start: np.ndarray,
    y: np.ndarray,
    s_w: np.ndarray,
    b_w: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """Add plays to m users' inverses P (m, k, k) and b (m, k), in place: user i (sorted by ascending
    ``degree``) has plays ``start[i] .. start[i] + degree[i] - 1`` (rows of y (nnz, k) float64 and of the
    weights: A_u += s_w y y^T, b_u += b_w y). Step p updates the suffix of users with more than p plays."""
    for p in range(int(degree[-1]) if len(degree) else 0):
        first = int(np.searchsorted(degree, p, side="right"))  # users with more than p plays
        rows = start[first:] + p
        yp = y[rows]
        _rank_one_updates(P, slice(first, None), yp, s_w[rows], scratch)
        b[first:] += b_w[rows, None] * yp


class UserChange(NamedTuple):
    """What a batch did to a user: state offsets before/after, `added` {track: (streams added, full count after)}."""

    before: int
    after: int
    added: Mapping[str, tuple[int, float]]


class LiveModel(ServingModel):
    """One model version + what the stream folded in on top of it; thread-compatible (callers serialise
    mutations). Every query (recommend, similar, popularity, explain) is the serving model's."""

    def __init__(
        self,
        model: Model,
        use_index: bool = True,
        search_k: int | None = None,
        system_cache_users: int = 20_000,
        exact_scan_items: int = EXACT_SCAN_ITEMS,
    ) -> None:
        super().__init__(
            model,
            stored_plays(model),
            load_forests(model.path) if use_index else None,
            search_k=search_k,
            exact_scan_items=exact_scan_items,
        )
        X = np.asarray(model.user_factors, dtype=np.float64)
        self.user_gram = X.T @ X
        #: The solved systems of recently active users: P_u = (G + reg I + S_u)^-1 and b_u (k x k float64:
        #: ~13 KB at k = 40), one slot per user in arrays of `system_cache_users` slots (LRU beyond;
        #: allocated on first use). A batch's new plays are rank-one changes of S_u, so P_u is updated by
        #: Sherman-Morrison steps and x_u = P_u b_u, a few array operations per chunk of users instead of a
        #: LAPACK solve per user (which costs ~10 us of per-matrix overhead at k = 40).
        self.system_cache_users = system_cache_users
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # user -> slot, least recently used first
        self._P = np.zeros((0, self.k, self.k))
        self._b = np.zeros((0, self.k))
        self._offsets = np.zeros(0, np.int64)  # the user's state offset the slot reflects
        self._known = np.zeros(0, bool)  # any known streamed track at all
        self._gram_at = np.zeros(0, np.int64)  # Gram changes (`_gram_total`) the slot's P_u includes
        self._updates = np.zeros(0, np.int64)  # rank-one updates since P_u was last inverted exactly
        self._free: list[int] = []
        self._track_users: dict[str, set[str]] = {}  # non-model track -> cached users counting it
        self._generation = 0  # bumped by add_tracks: systems solved across a change are not cached
        #: G + reg I, replaced (never mutated) by add_tracks, and the last GRAM_LOG_MAX rank-one changes of
        #: G as (weight +-1, vector) with their total count: cached inverses catch up with them.
        self._gram_reg = self._regularised(self.item_gram)
        self._gram_log: list[tuple[float, np.ndarray]] = []
        self._gram_total = 0
        self._base_inv: tuple[int, np.ndarray] | None = None  # (gram_total, (G + reg I)^-1)
        #: The lineage's history (batch.history): the counts the stream does not hold (a file's). A user's
        #: full counts are their history plus what streamed, exactly what a retrain trains on.
        self._history = history_arrays(model)
        self._training_cache: dict[str, dict[str, float]] = {}

    def _regularised(self, gram: np.ndarray) -> np.ndarray:
        """G + reg I, or G alone when the model scales reg by each user's tracks (`reg_exp` > 0: every
        system then gets its own lambda, `row_regularisation`, and is rebuilt rather than cached)."""
        return gram + (self.params.reg if self.params.reg_exp == 0 else 0.0) * np.eye(self.k)

    def track_regularisation(self, listeners: int) -> float:
        """lambda of a track's item half-step with `listeners` listeners (reg, or reg * n ** reg_exp)."""
        return float(row_regularisation(self.params.reg, self.params.reg_exp, np.array([listeners]))[0])

    def training_counts(self, user: str) -> dict[str, float]:
        """The user's streams in the lineage's history, i.e. not in the stream ({} for a stream-only
        lineage); a copy."""
        return dict(self._training(user))

    def full_count(self, user: str, track: str, streamed: int) -> float:
        """One track's full count for a user: history streams + `streamed`."""
        return self._training(user).get(track, 0.0) + float(streamed)

    def change(
        self, user: str, before: int, after: int, added: Mapping[str, int], counts: Mapping[str, int]
    ) -> UserChange:
        """The `UserChange` of a batch that added `added` {track: streams} to the user's streamed `counts`
        (already updated): per track (streams added, full count after)."""
        training = self._training(user)
        if training:
            return UserChange(before, after, {t: (n, training.get(t, 0.0) + counts[t]) for t, n in added.items()})
        return UserChange(before, after, {t: (n, float(counts[t])) for t, n in added.items()})

    def _training(self, user: str) -> dict[str, float]:
        row = self.user_index.get(user)
        if row is None or self._history is None:
            return {}
        cached = self._training_cache.get(user)
        if cached is None:
            indptr, indices, counts = self._history
            start, stop = int(indptr[row]), int(indptr[row + 1])
            ids = self.item_ids[np.asarray(indices[start:stop])].tolist()
            cached = dict(zip(ids, np.asarray(counts[start:stop], dtype=np.float64).tolist()))
            if len(self._training_cache) >= TRAINING_CACHE_USERS:
                self._training_cache.clear()
            self._training_cache[user] = cached
        return cached

    def full_counts(self, user: str, streamed: Mapping[str, float]) -> dict[str, float]:
        """History counts (batch.history: a file's, none for a stream-only lineage) plus the streamed counts."""
        full = self.training_counts(user)
        for track, count in streamed.items():
            full[track] = full.get(track, 0.0) + float(count)
        return full

    # -- fold-in -----------------------------------------------------------------------------
    def fold_in_users(
        self,
        counts: Mapping[str, Mapping[str, float]],
        changes: Mapping[str, UserChange] | None = None,
        on_solved: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Exact user half-step for many users at once from their FULL counts {user: {track: streams}}.

        Tracks unknown to this model (not yet folded in) are left out; a user without any known
        streamed track gets no vector (serve the popularity fallback). `changes` (from the stream)
        name the plays a batch added per user: a user whose cached system `P_u, b_u` is at the
        change's `before` offset is updated by those plays only (Sherman-Morrison rank-one updates of
        the inverse, exact up to rounding) instead of being rebuilt from all their counts; the result
        is the same solution. Only users named in `changes` are cached (one caller at a time may pass
        `changes`: the stream's fold-in). `on_solved`, if given, is called (in this thread) with each
        group of solutions as soon as it is solved: the users rebuilt from full counts first (users new to
        the stream, who have no vector yet), then each chunk of cached users.
        """
        changes = changes or {}
        # with frequency-scaled reg a user's first play of a track changes their lambda (a rank-k change of
        # the system): such users are rebuilt; repeat plays keep it and update the cached inverse
        scaled = self.params.reg_exp != 0
        incremental: list[str] = []
        slots: list[int] = []
        rebuild: list[str] = []
        with self._lock:
            generation = self._generation
            gram_reg, gram_total, gram_log = self._gram_reg, self._gram_total, list(self._gram_log)
            slot_of, offsets, gram_at, updates = self._slot_of, self._offsets, self._gram_at, self._updates
            for user in counts:
                change = changes.get(user)
                slot = slot_of.get(user) if change is not None else None
                if (
                    slot is not None
                    and offsets[slot] == change.before
                    and gram_total - gram_at[slot] <= len(gram_log)
                    and updates[slot] < REFRESH_UPDATES
                    and not (scaled and any(full == n for n, full in change.added.values()))
                ):
                    incremental.append(user)
                    slots.append(slot)
                    slot_of.move_to_end(user)  # in use: `_remember` below never evicts it
                else:
                    rebuild.append(user)
        out: dict[str, np.ndarray] = {}
        # The rebuilt users first (new users have no vector at all yet). `_remember` hands them free or
        # least recently used slots, never one of this call's users (those are in `changes`), so the cached
        # users' slots read chunk by chunk below stay theirs.
        if rebuild:  # a lazy `counts` mapping is only evaluated for the users rebuilt
            if changes:  # cached: inverses (the stream's users come back with a few plays each)
                P, b, known, news = self._build_inverses({u: counts[u] for u in rebuild}, gram_reg, gram_total)
                self._remember(rebuild, P, b, known, news, changes, generation, gram_total)
                solved = self._solve(rebuild, P, b, known, inverted=True)
            else:
                S, b, degree, news = self._build_systems({u: counts[u] for u in rebuild})
                S += gram_reg
                if self.params.reg_exp != 0:
                    add_to_diagonal(S, row_regularisation(self.params.reg, self.params.reg_exp, degree))
                solved = self._solve(rebuild, S, b, degree > 0)
            out.update(solved)
            if on_solved is not None and solved:
                on_solved(solved)
        if incremental:
            self._fold_incremental(incremental, slots, changes, generation, (gram_total, gram_log), out, on_solved)
        return out

    @staticmethod
    def _solve(
        users: list[str], M: np.ndarray, b: np.ndarray, known: np.ndarray, inverted: bool = False
    ) -> dict[str, np.ndarray]:
        """{user: x_u} for the users with any known track: x_u = M_u^-1 b_u with M_u = A_u = G + reg I + S_u,
        or x_u = M_u b_u when ``inverted`` (M_u = A_u^-1, the cached inverses)."""
        solvable = np.flatnonzero(known)
        if not len(solvable):
            return {}
        if len(solvable) < len(users):
            M, b = M[solvable], b[solvable]
        x = np.matmul(M, b[:, :, None]) if inverted else np.linalg.solve(M, b[:, :, None])
        return dict(zip((users[i] for i in solvable), x[:, :, 0].astype(np.float32)))

    def _fold_incremental(
        self,
        users: list[str],
        slots: list[int],
        changes: Mapping[str, UserChange],
        generation: int,
        gram: tuple[int, list[tuple[float, np.ndarray]]],
        out: dict[str, np.ndarray],
        on_solved: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> None:
        """Update the cached inverses of `users` with the Gram changes they missed (`gram`: total count and
        the last changes) and their batch's plays, and solve them, `FOLD_CHUNK_USERS` at a time: each
        chunk's systems are gathered from their slots, updated, stored back (when no track vector changed
        since `generation`) and solved while they are in the CPU cache, so no temporary array is sized by
        the whole batch (those cost page faults and memory bandwidth)."""
        indptr, cols, s_w, b_w, vectors, news = self._changed_plays(users, changes)
        # users by ascending number of plays: in a chunk, those with more than p plays are a suffix
        degree = np.diff(indptr)
        order = np.argsort(degree, kind="stable")
        users = [users[i] for i in order]
        news = [news[i] for i in order]
        degree = degree[order]
        pos = ragged_ranges(indptr[:-1][order], degree)
        cols, s_w, b_w = cols[pos], s_w[pos], b_w[pos]
        indptr = np.concatenate([[0], np.cumsum(degree)])
        y_all = np.asarray(vectors, dtype=np.float64)[cols]
        slot_index = np.asarray(slots, dtype=np.int64)[order]
        after = np.fromiter((changes[u].after for u in users), dtype=np.int64, count=len(users))
        gram_total, gram_log = gram
        scratch = np.empty((min(FOLD_CHUNK_USERS, len(users)), self.k, self.k))
        for start in range(0, len(users), FOLD_CHUNK_USERS):
            stop = min(len(users), start + FOLD_CHUNK_USERS)
            index = slot_index[start:stop]
            with self._lock:
                P, b, known = self._P[index], self._b[index], self._known[index]
                missed = gram_total - self._gram_at[index]
                updates = self._updates[index]
            if missed.any():
                for j, (weight, v) in enumerate(gram_log[len(gram_log) - int(missed.max()) :]):
                    behind = np.flatnonzero(missed >= int(missed.max()) - j)  # users that miss change j
                    _rank_one_updates(P, behind, np.broadcast_to(v, (len(behind), self.k)), weight, scratch)
                updates = updates + missed
            deg = degree[start:stop]
            _apply_plays(P, b, deg, indptr[start:stop], y_all, s_w, b_w, scratch)
            known |= deg > 0
            updates = updates + deg
            with self._lock:
                if generation == self._generation:  # else: systems may hold an old vector; not cached
                    self._P[index], self._b[index], self._known[index] = P, b, known
                    self._offsets[index] = after[start:stop]
                    self._gram_at[index] = gram_total
                    self._updates[index] = updates
                    slot_of = self._slot_of
                    for i in range(start, stop):
                        slot_of.move_to_end(users[i])
                        for track in news[i]:
                            self._track_users.setdefault(track, set()).add(users[i])
            solved = self._solve(users[start:stop], P, b, known, inverted=True)
            out.update(solved)
            if on_solved is not None and solved:
                on_solved(solved)

    def cached_offset(self, user: str) -> int | None:
        """The state offset the user's cached system reflects (None when not cached)."""
        with self._lock:
            slot = self._slot_of.get(user)
            return None if slot is None else int(self._offsets[slot])

    def _confidence(self, streams: np.ndarray) -> np.ndarray:
        return confidence_minus_one(streams, self.params.alpha, self.params.confidence, self.params.eps).astype(
            np.float64
        )

    def _full_plays(
        self, counts: Mapping[str, Mapping[str, float]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[set[str]]]:
        """Every streamed known track of each user as CSR rows: indptr (n + 1,), cols (nnz,) into vectors
        (n_tracks, k), confidence - 1 per play (nnz,) float64, and each user's non-model tracks."""
        tracks, vectors = self._gather(t for per_user in counts.values() for t, c in per_user.items() if c > 0)
        column = {t: j for j, t in enumerate(tracks)}
        item_index = self.item_index
        indptr, cols, data, news = [0], [], [], []
        for per_user in counts.values():
            known = [(column[t], c) for t, c in per_user.items() if c > 0 and t in column]
            cols.extend(j for j, _ in known)
            data.extend(c for _, c in known)
            indptr.append(len(cols))
            news.append({t for t in per_user if t not in item_index})
        w = self._confidence(np.asarray(data, dtype=np.float64))
        return np.asarray(indptr, dtype=np.int64), np.asarray(cols, dtype=np.int64), w, vectors, news

    def _build_systems(
        self, counts: Mapping[str, Mapping[str, float]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[set[str]]]:
        """S (n, k, k), b (n, k), each user's number of known streamed tracks (n,) and their non-model tracks
        from every streamed track of each user."""
        indptr, cols, w, vectors, news = self._full_plays(counts)
        S, b = assemble_rows(indptr, cols, w, 1.0 + w, vectors)
        return S, b, np.diff(indptr), news

    def _build_inverses(
        self, counts: Mapping[str, Mapping[str, float]], gram_reg: np.ndarray, gram_total: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[set[str]]]:
        """P (n, k, k) = (G + reg I + S_u)^-1, b (n, k), known (n,) and non-model tracks of each user, from
        every streamed track: users with at most SM_BUILD_TRACKS tracks by rank-one updates of
        (G + reg I)^-1, the others by assembling S_u and inverting (all, with the user's own lambda, under
        frequency-scaled reg)."""
        indptr, cols, w, vectors, news = self._full_plays(counts)
        n, k = len(indptr) - 1, self.k
        degree = np.diff(indptr)
        P, b = np.empty((n, k, k)), np.zeros((n, k))
        scaled = self.params.reg_exp != 0  # each user's own lambda: no shared base inverse to start from
        many = np.flatnonzero(degree > (0 if scaled else SM_BUILD_TRACKS))
        if len(many):
            pos = ragged_ranges(indptr[:-1][many], degree[many])
            sub = np.concatenate([[0], np.cumsum(degree[many])])
            S, b[many] = assemble_rows(sub, cols[pos], w[pos], 1.0 + w[pos], vectors)
            S += gram_reg
            if scaled:
                add_to_diagonal(S, row_regularisation(self.params.reg, self.params.reg_exp, degree[many]))
            P[many] = np.linalg.inv(S)
        few = np.setdiff1d(np.arange(n), many)
        if scaled:  # users without any known track: their first known play rebuilds them (it adds a track)
            P[few] = 0.0
        elif len(few):
            few = few[np.argsort(degree[few], kind="stable")]
            base = self._base_inverse(gram_reg, gram_total)
            y = np.asarray(vectors, dtype=np.float64)[cols] if len(cols) else np.zeros((0, k))
            scratch = np.empty((min(FOLD_CHUNK_USERS, len(few)), k, k))
            for start in range(0, len(few), FOLD_CHUNK_USERS):
                idx = few[start : start + FOLD_CHUNK_USERS]
                Pc = np.repeat(base[None], len(idx), axis=0)
                bc = np.zeros((len(idx), k))
                _apply_plays(Pc, bc, degree[idx], indptr[idx], y, w, 1.0 + w, scratch)
                P[idx], b[idx] = Pc, bc
        return P, b, degree > 0, news

    def _base_inverse(self, gram_reg: np.ndarray, gram_total: int) -> np.ndarray:
        """(G + reg I)^-1 for the Gram matrix after `gram_total` changes (cached per change count)."""
        cached = self._base_inv
        if cached is None or cached[0] != gram_total:
            cached = self._base_inv = (gram_total, np.linalg.inv(gram_reg))
        return cached[1]

    def _changed_plays(
        self, users: list[str], changes: Mapping[str, UserChange]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[set[str]]]:
        """The batch's plays of known tracks as CSR rows per user: indptr, cols into vectors, the weights of
        the exact updates (dS = sum s_w y y^T, db = sum b_w y), the tracks' vectors, new non-model tracks."""
        item_index = self.item_index
        rows_l, tracks_l, added_l, after_l = [], [], [], []
        news: list[set[str]] = []
        for i, user in enumerate(users):
            fresh: set[str] = set()
            for t, (n, full) in changes[user].added.items():
                if n > 0:
                    rows_l.append(i)
                    tracks_l.append(t)
                    added_l.append(n)
                    after_l.append(full)
                if t not in item_index:
                    fresh.add(t)
            news.append(fresh)
        tracks, vectors = self._gather(tracks_l)
        column = {t: j for j, t in enumerate(tracks)}
        keep = [j for j, t in enumerate(tracks_l) if t in column]
        if len(keep) < len(tracks_l):
            rows_l, tracks_l = [rows_l[j] for j in keep], [tracks_l[j] for j in keep]
            added_l, after_l = [added_l[j] for j in keep], [after_l[j] for j in keep]
        rows = np.asarray(rows_l, dtype=np.int64)  # users in order: rows already sorted
        cols = np.fromiter((column[t] for t in tracks_l), dtype=np.int64, count=len(tracks_l))
        after = np.asarray(after_l, dtype=np.float64)
        before = after - np.asarray(added_l, dtype=np.float64)
        w_after, w_before = self._confidence(after), self._confidence(np.maximum(before, 0.0))
        fresh_track = before <= 0
        s_w = np.where(fresh_track, w_after, w_after - w_before)
        b_w = np.where(fresh_track, 1.0 + w_after, w_after - w_before)
        indptr = np.searchsorted(rows, np.arange(len(users) + 1))
        return indptr, cols, s_w, b_w, vectors, news

    def advance(self, user: str, before: int, after: int) -> None:
        """A batch moved the user's state offset without adding streams: the cached system stays valid."""
        with self._lock:
            slot = self._slot_of.get(user)
            if slot is not None and self._offsets[slot] == before:
                self._offsets[slot] = after

    def users_moved(self, old: np.ndarray, new: np.ndarray) -> None:
        """Keep X^T X current when many user vectors change: old/new (n, k), zero rows for none."""
        old64, new64 = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
        self.user_gram = self.user_gram - old64.T @ old64 + new64.T @ new64

    def _remember(
        self,
        users: list[str],
        P: np.ndarray,
        b: np.ndarray,
        known: np.ndarray,
        news: list[set[str]],
        changes: Mapping[str, UserChange],
        generation: int,
        gram_total: int,
    ) -> None:
        """Cache the systems of `users` (those named in `changes`) at their new offsets, LRU-bounded;
        index their non-model tracks for invalidation. Nothing is cached when a track vector changed
        since `generation` (the systems may have been built with an old vector)."""
        with self._lock:
            if generation != self._generation:
                return
            slot_of = self._slot_of
            rows, slots = [], []
            for user in users:  # users of this call are the most recent: keep them
                if user in changes and user in slot_of:
                    slot_of.move_to_end(user)
            for i, user in enumerate(users):
                change = changes.get(user)
                if change is None:
                    continue
                slot = slot_of.get(user)
                if slot is None:
                    slot = self._free_slot(changes)
                    if slot is None:
                        continue  # the cache is full of this call's users
                    slot_of[user] = slot
                rows.append(i)
                slots.append(slot)
                self._offsets[slot] = change.after
                if news[i]:  # (a superset is harmless: it only invalidates more often)
                    for track in news[i]:
                        self._track_users.setdefault(track, set()).add(user)
            if slots:
                index = np.asarray(slots, dtype=np.int64)
                if len(rows) < len(users):
                    pick = np.asarray(rows, dtype=np.int64)
                    P, b, known = P[pick], b[pick], known[pick]
                self._P[index] = P
                self._b[index] = b
                self._known[index] = known
                self._gram_at[index] = gram_total
                self._updates[index] = 0

    def _free_slot(self, current: Mapping[str, UserChange]) -> int | None:
        """A slot for one more user: a free one, or the least recently used user's."""
        if not self._free and not len(self._offsets) and self.system_cache_users > 0:
            # allocated once, uninitialised: the OS backs the pages as slots are first used
            n, k = self.system_cache_users, self.k
            self._P, self._b = np.empty((n, k, k)), np.empty((n, k))
            self._offsets, self._known = np.full(n, -2, np.int64), np.zeros(n, bool)
            self._gram_at, self._updates = np.zeros(n, np.int64), np.zeros(n, np.int64)
            self._free.extend(range(n - 1, -1, -1))
        if self._free:
            return self._free.pop()
        if not self._slot_of:
            return None
        oldest = next(iter(self._slot_of))
        if oldest in current:
            return None
        return self._slot_of.pop(oldest)

    def fold_in_tracks(self, listeners: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Exact item half-step for new tracks: {track: (listener vectors (n, k), streams (n,))}."""
        tracks = [t for t, (vecs, counts) in listeners.items() if len(counts)]
        if not tracks:
            return {}
        blocks = [np.asarray(listeners[t][0], dtype=np.float32).reshape(-1, self.k) for t in tracks]
        counts = [np.asarray(listeners[t][1], dtype=np.float32).ravel() for t in tracks]
        sizes = np.array([len(c) for c in counts])
        indptr = np.concatenate([[0], np.cumsum(sizes)])
        plays = sp.csr_matrix(
            (np.concatenate(counts), np.arange(indptr[-1]), indptr), shape=(len(tracks), int(indptr[-1]))
        )
        solved = fold_in(plays, np.concatenate(blocks), self.params, gram=self.user_gram)
        return dict(zip(tracks, solved))

    def add_tracks(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Insert (or update) folded-in tracks: searchable at once, part of later user fold-ins."""
        with self._lock:
            self._generation += 1
            for track in vectors:  # cached systems that count these tracks were built without (or with old) vectors
                for user in self._track_users.pop(track, ()):
                    slot = self._slot_of.pop(user, None)
                    if slot is not None:
                        self._free.append(slot)
            # copy-on-write: a fold-in running in a thread keeps a consistent gram
            changed, fresh = self._store_tracks(vectors)
            self._gram_reg = self._regularised(self.item_gram)
            # cached inverses catch up with the last GRAM_LOG_MAX changes; older ones are rebuilt
            self._gram_log = (self._gram_log + changed)[-GRAM_LOG_MAX:]
            self._gram_total += len(changed)
        self._index_tracks(vectors, fresh)
