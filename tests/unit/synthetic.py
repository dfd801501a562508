"""Small seeded synthetic play-count matrices for unit tests."""

import numpy as np
import scipy.sparse as sp

from batch.plays import PlayCounts


def random_plays(n_users: int = 300, n_items: int = 200, density: float = 0.05, seed: int = 0) -> sp.csr_matrix:
    """Users x items CSR of heavy-tailed stream counts with power-law item popularity (float32)."""
    rng = np.random.default_rng(seed)
    nnz = int(n_users * n_items * density)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.7
    rows = rng.integers(0, n_users, nnz)
    cols = rng.choice(n_items, nnz, p=popularity / popularity.sum())
    counts = np.ceil(rng.pareto(1.2, nnz) + 1).astype(np.float32)
    plays = sp.csr_matrix((counts, (rows, cols)), shape=(n_users, n_items), dtype=np.float32)
    plays.sum_duplicates()
    plays.sort_indices()
    return plays


def synthetic_counts(plays: sp.csr_matrix) -> PlayCounts:
    """`plays` as PlayCounts with users "u0", "u1", ... and tracks "t0", "t1", ..."""
    n_users, n_tracks = plays.shape
    return PlayCounts(plays, np.array([f"u{i}" for i in range(n_users)]), np.array([f"t{i}" for i in range(n_tracks)]))


def gram_from_scratch(live, states) -> np.ndarray:
    """The X^T X a worker's track half-step uses, computed from scratch: the model's user factors with each
    row replaced by the user's fold-in vector of the live version, plus new users' vectors.
    `states`: (user, UserState) pairs. (k, k) float64."""
    X = np.asarray(live.model.user_factors, np.float64).copy()
    extra = []
    for user, state in states:
        if state.vector is None or state.version != live.version:
            continue
        row = live.user_index.get(user)
        if row is None:
            extra.append(state.vector)
        else:
            X[row] = state.vector
    X = np.vstack([X, np.asarray(extra, np.float64)]) if extra else X
    return X.T @ X
