"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008): the batch trainer.

`train_als` alternates the user and the item half-step (batch.solvers) for a number of iterations
and reports the Hu loss per iteration. Factors are float32 and seeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from batch.confidence import CONFIDENCE_KINDS, ConfidenceKind, confidence_matrix
from batch.solvers import SOLVERS, Solver, half_step, row_chunks, row_regularisation, single_threaded_blas

log = logging.getLogger(__name__)


class AlsParamsError(ValueError):
    """Invalid training parameters."""


@dataclass(frozen=True)
class AlsParams:
    """ALS hyper-parameters. Defaults rank well on heavy-tailed music play counts (docs/BENCHMARKS.md)."""

    factors: int = 40
    iterations: int = 20
    alpha: float = 2.0
    reg: float = 20.0
    #: frequency scaling of reg (Rendle et al. 2021): row u's lambda is reg * n_u ** reg_exp with n_u its
    #: number of non-zeros (batch.solvers.row_regularisation); 0 = Hu et al.'s constant lambda, 1 = ALS-WR
    reg_exp: float = 0.0
    confidence: ConfidenceKind = "log"
    eps: float = 1.0
    solver: Solver = "cg"
    cg_steps: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.factors < 1:
            raise AlsParamsError(f"factors must be >= 1, got {self.factors}")
        if self.iterations < 0:
            raise AlsParamsError(f"iterations must be >= 0, got {self.iterations}")
        if not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise AlsParamsError(f"alpha must be a positive number, got {self.alpha}")
        if not (self.reg >= 0 and np.isfinite(self.reg)):
            raise AlsParamsError(f"reg must be a number >= 0, got {self.reg}")
        if not (0 <= self.reg_exp <= 2):
            raise AlsParamsError(f"reg_exp must be a number in [0, 2], got {self.reg_exp}")
        if self.confidence not in CONFIDENCE_KINDS:
            raise AlsParamsError(f"confidence must be one of {', '.join(CONFIDENCE_KINDS)}, got {self.confidence!r}")
        if self.eps <= 0:
            raise AlsParamsError(f"eps must be positive, got {self.eps}")
        if self.solver not in SOLVERS:
            raise AlsParamsError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.cg_steps < 1:
            raise AlsParamsError(f"cg_steps must be >= 1, got {self.cg_steps}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AlsResult:
    """Trained factors: user_factors (n_users, k), item_factors (n_items, k), float32.

    losses[i] is the Hu loss after iteration i+1, normalised by the total confidence weight
    (sum of c over all user x item pairs), as implicit reports it. seconds[i] is the wall time of
    iteration i+1 without the loss evaluation.
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def initial_factors(n_rows: int, factors: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded starting factors, uniform in [0, 0.01) like implicit's, float32 (n_rows, factors)."""
    return (rng.random((n_rows, factors), dtype=np.float32) * np.float32(0.01)).astype(np.float32)


def _gram(factors: np.ndarray, block: int = 65536) -> np.ndarray:
    """factors^T factors in float64, accumulated over row blocks (no full float64 copy)."""
    k = factors.shape[1]
    out = np.zeros((k, k), dtype=np.float64)
    for start in range(0, factors.shape[0], block):
        chunk = factors[start : start + block].astype(np.float64)
        out += chunk.T @ chunk
    return out


def hu_loss(
    cm1: sp.csr_matrix, user_factors: np.ndarray, item_factors: np.ndarray, reg: float, reg_exp: float = 0.0
) -> float:
    """Hu et al. loss `sum c (p - x.y)^2 + reg (|X|^2 + |Y|^2)` over ALL user x item pairs (float64).

    With reg_exp > 0 each row's squared norm is weighted by its own lambda (`row_regularisation`).
    cm1: CSR (n_users, n_items) of `c - 1`. Uses `sum_all (x.y)^2 = <X^T X, Y^T Y>` so the cost is
    O(nnz k + (n + m) k^2); temporaries stay small (row blocks, 8K non-zeros at a time).
    """
    X = np.asarray(user_factors, dtype=np.float32)
    Y = np.asarray(item_factors, dtype=np.float32)
    gram_x, gram_y = _gram(X), _gram(Y)
    total = float(np.sum(gram_x * gram_y))
    indptr, indices, data = cm1.indptr, cm1.indices, cm1.data
    for lo, hi in row_chunks(indptr, 8192, 8192):
        s, e = indptr[lo], indptr[hi]
        if s == e:
            continue
        d = np.einsum(
            "ij,ij->i", np.take(Y, indices[s:e], axis=0), np.repeat(X[lo:hi], np.diff(indptr[lo : hi + 1]), axis=0)
        ).astype(np.float64)
        c = data[s:e].astype(np.float64) + 1.0
        total += float(np.sum(c * (1.0 - d) ** 2 - d**2))
    if reg_exp == 0:
        total += reg * (float(np.trace(gram_x)) + float(np.trace(gram_y)))
    else:
        user_reg = row_regularisation(reg, reg_exp, np.diff(cm1.indptr))
        item_reg = row_regularisation(reg, reg_exp, np.bincount(cm1.indices, minlength=cm1.shape[1]))
        total += float(user_reg @ np.einsum("ij,ij->i", X, X, dtype=np.float64))
        total += float(item_reg @ np.einsum("ij,ij->i", Y, Y, dtype=np.float64))
    return total


def loss_normaliser(cm1: sp.csr_matrix) -> float:
    """Sum of the confidence weights over all pairs: n_users * n_items + sum(c - 1)."""
    return float(cm1.shape[0]) * float(cm1.shape[1]) + float(cm1.data.sum(dtype=np.float64))


def train_als(
    plays: sp.csr_matrix,
    params: AlsParams | None = None,
    *,
    user_factors: np.ndarray | None = None,
    item_factors: np.ndarray | None = None,
    compute_loss: bool = True,
    show_progress: bool = True,
    n_threads: int | None = None,
    callback: Callable[[int, AlsResult], None] | None = None,
) -> AlsResult:
    """Train implicit ALS on a users x tracks matrix of stream counts.

    plays: CSR (n_users, n_items), entries = streams (>= 0; zeros carry no preference).
    user_factors / item_factors: optional starting factors (float32), e.g. to compare with a peer
    from the same start; otherwise drawn from `params.seed`.
    callback(iteration, result) runs after every iteration (1-based).
    """
    params = params or AlsParams()
    plays = sp.csr_matrix(plays, dtype=np.float32)
    plays.eliminate_zeros()
    if plays.data.size and plays.data.min() < 0:
        raise AlsParamsError("plays must be >= 0")
    n_users, n_items = plays.shape
    rng = np.random.default_rng(params.seed)
    X = (
        initial_factors(n_users, params.factors, rng)
        if user_factors is None
        else _checked(user_factors, n_users, params)
    )
    Y = (
        initial_factors(n_items, params.factors, rng)
        if item_factors is None
        else _checked(item_factors, n_items, params)
    )
    cm1 = confidence_matrix(plays, params.alpha, params.confidence, params.eps)
    cm1_t = cm1.T.tocsr()
    cm1_t.sort_indices()
    norm = loss_normaliser(cm1)
    result = AlsResult(X, Y)
    log.info("training ALS on %d users x %d items, %d non-zeros: %s", n_users, n_items, plays.nnz, params.to_dict())
    bar = tqdm(range(1, params.iterations + 1), desc="ALS", unit="it", disable=not show_progress)
    for iteration in bar:
        start = time.perf_counter()
        X = half_step(cm1, Y, X, params.reg, params.solver, params.cg_steps, n_threads, reg_exp=params.reg_exp)
        Y = half_step(cm1_t, X, Y, params.reg, params.solver, params.cg_steps, n_threads, reg_exp=params.reg_exp)
        result.seconds.append(time.perf_counter() - start)
        result.user_factors, result.item_factors = X, Y
        if compute_loss:
            with single_threaded_blas():  # like the half-steps: BLAS threads only contend on a busy box
                result.losses.append(hu_loss(cm1, X, Y, params.reg, params.reg_exp) / norm)
            bar.set_postfix(loss=f"{result.losses[-1]:.6f}", s_per_it=f"{result.seconds[-1]:.2f}")
        if callback is not None:
            callback(iteration, result)
    bar.close()
    if result.losses:
        log.info("ALS done: final loss %.6f, %.3f s/iteration", result.losses[-1], float(np.median(result.seconds)))
    return result


def _checked(factors: np.ndarray, n_rows: int, params: AlsParams) -> np.ndarray:
    factors = np.array(factors, dtype=np.float32, copy=True)
    if factors.shape != (n_rows, params.factors):
        raise AlsParamsError(f"initial factors must be shaped {(n_rows, params.factors)}, got {factors.shape}")
    return factors
