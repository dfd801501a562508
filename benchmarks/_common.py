"""Shared helpers of the benchmark scripts: data sets, the implicit peer, timing and memory.

Data never lives in the repository: the real data sets are read from `PLAYREC_DATA` (default
`../shared/data` next to the repository root), the synthetic ones are generated from a seed.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python benchmarks/<script>.py` without an editable install
    sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("PLAYREC_DATA", ROOT.parent / "shared" / "data"))
LASTFM = DATA / "lastfm-2k" / "user_artists.dat"
ML100K = DATA / "ml-100k" / "u.data"


@dataclass
class Dataset:
    """A users x items CSR of stream counts (float32), optionally with last-played timestamps."""

    name: str
    plays: sp.csr_matrix
    timestamps: sp.csr_matrix | None = None

    def describe(self) -> str:
        n, m = self.plays.shape
        return f"{self.name}: {n:,} users x {m:,} items, {self.plays.nnz:,} non-zeros"


def synthetic_plays(
    n_users: int,
    n_items: int,
    nnz: int,
    seed: int = 0,
    item_exponent: float = 1.0,
    user_sigma: float = 1.0,
    count_exponent: float = 1.7,
    max_count: int = 100_000,
) -> sp.csr_matrix:
    """A seeded users x items CSR of heavy-tailed stream counts with power-law item popularity.

    Item popularity follows Zipf (`p_i ~ rank^-item_exponent`, items shuffled so the popular ones are
    not all at low ids), user activity is log-normal (`user_sigma`), and each (user, item) pair gets a
    Zipf-distributed play count (`P(n) ~ n^-count_exponent`, capped at `max_count`) like real music
    counts. Pairs are sampled independently and de-duplicated until exactly `nnz` remain (or the
    matrix is full).
    """
    nnz = min(nnz, n_users * n_items)
    rng = np.random.default_rng(seed)
    item_p = np.arange(1, n_items + 1, dtype=np.float64) ** -item_exponent
    item_p = rng.permutation(item_p / item_p.sum())
    user_p = rng.lognormal(0.0, user_sigma, n_users)
    user_p /= user_p.sum()
    item_cdf, user_cdf = np.cumsum(item_p), np.cumsum(user_p)
    keys = np.empty(0, dtype=np.int64)
    while keys.size < nnz:
        draw = int((nnz - keys.size) * 1.3) + 1000
        u = np.minimum(np.searchsorted(user_cdf, rng.random(draw), side="right"), n_users - 1)
        i = np.minimum(np.searchsorted(item_cdf, rng.random(draw), side="right"), n_items - 1)
        keys = np.unique(np.concatenate([keys, u.astype(np.int64) * n_items + i]))
    keys = np.sort(rng.choice(keys, nnz, replace=False)) if keys.size > nnz else keys
    counts = np.minimum(rng.zipf(count_exponent, nnz), max_count).astype(np.float32)
    rows, cols = np.divmod(keys, n_items)
    out = sp.csr_matrix((counts, (rows.astype(np.int32), cols.astype(np.int32))), shape=(n_users, n_items))
    out.sort_indices()
    return out


@dataclass
class FactorSynthetic:
    """Plays drawn from known factors (`factor_synthetic`) and the truth they were drawn from.

    The expected plays of (u, i) are `scale * activity[u] * popularity[i] * exp(user_factors[u] @
    item_factors[i])`, so ranking a user's tracks by `log popularity[i] + user_factors[u] @ item_factors[i]`
    is the oracle (`oracle_factors`).
    """

    plays: sp.csr_matrix
    user_factors: np.ndarray
    item_factors: np.ndarray
    activity: np.ndarray
    popularity: np.ndarray
    scale: float

    def oracle_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) factors whose inner products rank every user's tracks by the true expected plays."""
        ones = np.ones((self.user_factors.shape[0], 1))
        X = np.hstack([self.user_factors, ones]).astype(np.float32)
        Y = np.hstack([self.item_factors, np.log(self.popularity)[:, None]]).astype(np.float32)
        return X, Y


def factor_synthetic(
    n_users: int = 3_000,
    n_items: int = 4_000,
    rank: int = 16,
    nnz: int = 125_000,
    seed: int = 0,
    factor_sd: float = 0.6,
    user_sigma: float = 1.0,
    item_exponent: float = 0.9,
) -> FactorSynthetic:
    """Seeded users x items Poisson play counts from true rank-`rank` factors (nothing is written to disk).

    User and track factors are i.i.d. N(0, factor_sd^2) (true scores `s = u . v`, sd ~ factor_sd^2 *
    sqrt(rank) = 1.44 by default); per-user activity is log-normal (`user_sigma`), per-track popularity Zipf
    (`rank^-item_exponent`, shuffled). Plays ~ Poisson(scale * activity * popularity * exp(s)), with `scale`
    found by bisection so the expected number of non-zeros is `nnz`. Defaults: ~124K non-zeros in 3,000 x
    4,000, counts median 1, 99.9th percentile ~60, max ~1,200.
    """
    rng = np.random.default_rng(seed)
    U = rng.normal(0.0, factor_sd, (n_users, rank))
    V = rng.normal(0.0, factor_sd, (n_items, rank))
    activity = rng.lognormal(0.0, user_sigma, n_users)
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -item_exponent
    popularity = rng.permutation(popularity / popularity.mean())
    base = activity[:, None] * popularity[None, :] * np.exp(U @ V.T)
    lo, hi = 1e-12, 1e6
    for _ in range(50):  # E[nnz](scale) = sum(1 - exp(-scale * base)) is increasing in scale
        scale = float(np.sqrt(lo * hi))
        lo, hi = (scale, hi) if -np.expm1(-scale * base).sum() < nnz else (lo, scale)
    counts = rng.poisson(scale * base).astype(np.float32)
    plays = sp.csr_matrix(counts)
    plays.sort_indices()
    return FactorSynthetic(plays, U.astype(np.float32), V.astype(np.float32), activity, popularity, scale)


SYNTHETIC = {
    "synth-50k": (50_000, 20_000, 1_000_000),
    "synth-200k": (200_000, 100_000, 5_000_000),
}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """`lastfm`, `ml100k` (binarised ratings, with timestamps) or one of `SYNTHETIC`."""
    from batch.plays import read_play_counts

    if name == "lastfm":
        pc = read_play_counts(LASTFM)
        return Dataset("Last.fm 2K", pc.matrix.astype(np.float32), pc.last_played)
    if name == "ml100k":
        pc = read_play_counts(ML100K, binarize=True)
        return Dataset("MovieLens 100K", pc.matrix.astype(np.float32), pc.last_played)
    if name in SYNTHETIC:
        n, m, nnz = SYNTHETIC[name]
        return Dataset(f"synthetic {n // 1000}K x {m // 1000}K x {nnz / 1e6:g}M", synthetic_plays(n, m, nnz, seed))
    raise SystemExit(f"unknown dataset {name!r}; choose lastfm, ml100k, {', '.join(SYNTHETIC)}")


def csr_bytes(m: sp.csr_matrix) -> int:
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)


def blas_single_thread():
    """Context manager limiting BLAS to one thread (implicit's docs ask for it)."""
    import implicit.cpu.als  # noqa: F401 - load every BLAS (scipy's, via implicit) before limiting them
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def implicit_als(
    conf: sp.csr_matrix,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    factors: int,
    iterations: int,
    reg: float,
    cg_steps: int = 3,
    use_cg: bool = True,
    num_threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Fit implicit's CPU ALS from the given start on `conf` = the confidence matrix `c` itself.

    num_threads: implicit's OpenMP threads (0 = all cores).
    Returns (user_factors, item_factors, seconds per iteration as reported by its callback).
    """
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=factors,
        regularization=reg,
        alpha=1.0,
        iterations=iterations,
        use_cg=use_cg,
        calculate_training_loss=False,
        num_threads=num_threads,
        random_state=0,
    )
    model.cg_steps = cg_steps
    model.user_factors = np.array(user_factors, dtype=np.float32, copy=True)
    model.item_factors = np.array(item_factors, dtype=np.float32, copy=True)
    seconds: list[float] = []
    model.fit(conf, show_progress=False, callback=lambda it, elapsed, loss: seconds.append(elapsed))
    return model.user_factors, model.item_factors, seconds


def implicit_confidence(cm1: sp.csr_matrix) -> sp.csr_matrix:
    """implicit's input: `c = 1 + (c - 1)` with the same pattern (users x items CSR, float32)."""
    out = sp.csr_matrix((cm1.data + np.float32(1.0), cm1.indices, cm1.indptr), shape=cm1.shape, dtype=np.float32)
    return out


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def traced_peak(fn: Callable[[], object]) -> tuple[object, int]:
    """Run `fn` under tracemalloc; returns (result, peak bytes allocated above the level at the start).

    numpy and scipy report their array buffers to tracemalloc, so this measures the arrays the call
    allocates (not the interpreter, not BLAS/OpenMP workspaces).
    """
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        value = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return value, peak - base


def machine_notes() -> str:
    import implicit
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {cpu}, {os.cpu_count()} CPUs; load average at start "
        f"{', '.join(f'{v:.2f}' for v in load)}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, implicit {implicit.__version__}"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
