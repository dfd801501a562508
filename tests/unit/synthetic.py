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
