"""Self-tuning ALS: choose the confidence form, alpha and reg on a validation split of the training plays.

Successive halving (Jamieson & Talwalkar 2016) over a grid: every candidate trains a few iterations from
the same seeded start on the validation split's training part and is ranked by NDCG@k on its held-out
part (P@k breaks ties); the best third trains on from where it stopped, and so on, until the last rung
(`rungs[-1]` iterations in all) names the choice. The validation split is carved from the plays given
(a caller that reports a holdout passes its training part only, so the reported holdout is never seen).

Cost: the plan's iterations are counted against `budget` plain fits (`base.iterations` iterations on all
plays; an iteration on the validation part counts as its share of the non-zeros); a plan over budget is
thinned (every other candidate) before it starts, and the wall clock stops the search early if the
evaluations cost more than planned (the best of the last completed rung wins).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from batch.als import AlsParams, train_als
from batch.evaluation import holdout_split, ranking_metrics

log = logging.getLogger(__name__)

#: log confidence: alpha x (reg / alpha). The best reg grows with alpha (docs/BENCHMARKS-als.md: Last.fm
#: near 20-25 x alpha, MovieLens 100K near 5-10 x alpha), so reg is searched relative to alpha.
LOG_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
LOG_REG_PER_ALPHA = (2.5, 10.0, 40.0)
#: linear confidence: alpha x reg (binarised or light counts; the best linear alpha is tiny on music).
LINEAR_ALPHAS = (0.003, 0.03, 0.3)
LINEAR_REGS = (3.0, 10.0, 30.0)


class TuningError(ValueError):
    """The plays cannot be tuned on as asked."""


@dataclass(frozen=True)
class TuneSettings:
    """How the search runs. budget: the most work it may take, in plain fits."""

    budget: float = 5.0
    validation: float = 0.2
    k: int = 10
    rungs: tuple[int, ...] = (4, 10, 20)
    eta: int = 3
    max_users: int = 2_000

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise TuningError(f"the tuning budget must be > 0 plain fits, got {self.budget}")
        if not 0 < self.validation < 1:
            raise TuningError(f"the validation fraction must be between 0 and 1, got {self.validation}")
        if not self.rungs or any(b <= a for a, b in itertools.pairwise(self.rungs)) or self.rungs[0] < 1:
            raise TuningError(f"rungs must be increasing iteration counts >= 1, got {self.rungs}")
        if self.eta < 2:
            raise TuningError(f"eta must be >= 2, got {self.eta}")


@dataclass
class Trial:
    """One candidate evaluated at one rung: validation metrics after `iterations` iterations in all."""

    confidence: str
    alpha: float
    reg: float
    rung: int
    iterations: int
    ndcg: float
    precision: float
    seconds: float

    def key(self) -> tuple[str, float, float]:
        return self.confidence, self.alpha, self.reg


@dataclass
class TuneResult:
    """The choice and every trial; `work` is the search's cost in plain fits (planned iterations)."""

    choice: AlsParams
    trials: list[Trial]
    seconds: float
    work: float
    budget: float
    candidates: int
    stopped_early: bool = False
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `training.tuning` (json-serialisable)."""
        best = {"confidence": self.choice.confidence, "alpha": self.choice.alpha, "reg": self.choice.reg}
        return {
            "choice": best,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 3),
            "work_fits": round(self.work, 3),
            "budget_fits": self.budget,
            "stopped_early": self.stopped_early,
            "validation": self.validation,
            "trials": [asdict(t) for t in self.trials],
        }


def candidate_grid(base: AlsParams, around: AlsParams | None = None) -> list[AlsParams]:
    """The candidates: the full grid, or with `around` (a previous choice: warm start) its neighbours
    (alpha and reg x 1/2, 1, 2, same confidence form). Always includes `base` itself."""
    if around is not None:
        points = [
            (around.confidence, around.alpha * fa, around.reg * fr) for fa in (0.5, 1.0, 2.0) for fr in (0.5, 1.0, 2.0)
        ]
    else:
        points = [("log", a, a * r) for a in LOG_ALPHAS for r in LOG_REG_PER_ALPHA]
        points += [("linear", a, r) for a in LINEAR_ALPHAS for r in LINEAR_REGS]
    points.append((base.confidence, base.alpha, base.reg))
    seen: set[tuple[str, float, float]] = set()
    out = []
    for confidence, alpha, reg in points:
        key = (confidence, round(alpha, 9), round(reg, 9))
        if key not in seen:
            seen.add(key)
            out.append(replace(base, confidence=confidence, alpha=float(key[1]), reg=float(key[2])))
    return out


def plan_iterations(n: int, rungs: tuple[int, ...], eta: int) -> int:
    """Validation iterations successive halving spends on `n` candidates."""
    total, previous = 0, 0
    for rung in rungs:
        total += n * (rung - previous)
        previous, n = rung, max(1, math.ceil(n / eta))
    return total


def tune(
    plays: sp.csr_matrix,
    base: AlsParams,
    settings: TuneSettings | None = None,
    timestamps: sp.csr_matrix | None = None,
    around: AlsParams | None = None,
    show_progress: bool = True,
) -> TuneResult:
    """Choose confidence, alpha and reg for `plays` (CSR users x tracks of counts); other fields of `base`
    (factors, iterations, solver, seed) are kept. `timestamps` (aligned with `plays`) make the validation
    split hold out each user's latest tracks; `around` warm-starts from a previous choice."""
    settings = settings or TuneSettings()
    started = time.perf_counter()
    plays = sp.csr_matrix(plays)
    try:
        train, valid = holdout_split(plays, settings.validation, seed=base.seed + 1, timestamps=timestamps)
    except ValueError as exc:
        raise TuningError(f"cannot carve a validation split from these plays: {exc}") from None
    if valid.nnz == 0:
        raise TuningError("no user has enough tracks for a validation split (at least 5 each): tune with more plays")
    rungs = tuple(sorted({min(r, max(1, base.iterations)) for r in settings.rungs}))
    candidates = candidate_grid(base, around)
    share = train.nnz / max(1, plays.nnz)  # an iteration on the validation part, in full iterations
    allowed = settings.budget * max(1, base.iterations) / share
    base_key = (base.confidence, round(base.alpha, 9), round(base.reg, 9))
    keep_base = next(c for c in candidates if (c.confidence, c.alpha, c.reg) == base_key)
    while len(candidates) > 2 and plan_iterations(len(candidates), rungs, settings.eta) > allowed:
        candidates = candidates[::2] if keep_base in candidates[::2] else [*candidates[::2], keep_base]
    planned = plan_iterations(len(candidates), rungs, settings.eta)
    log.info(
        "tuning on %d validation pairs of %d users: %d candidates, rungs %s, %.2f plain fits planned (budget %.1f)",
        valid.nnz,
        int(np.count_nonzero(np.diff(valid.indptr))),
        len(candidates),
        rungs,
        planned * share / max(1, base.iterations),
        settings.budget,
    )
    trials: list[Trial] = []
    state: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {i: (None, None) for i in range(len(candidates))}
    alive = list(range(len(candidates)))
    previous = 0
    per_iteration: list[float] = []
    stopped_early = False
    bar = tqdm(total=planned, desc="tune", unit="it", disable=not show_progress)
    last_complete: list[Trial] = []
    for rung_index, rung in enumerate(rungs):
        rung_trials: list[Trial] = []
        for i in alive:
            params = replace(candidates[i], iterations=rung - previous)
            t0 = time.perf_counter()
            X, Y = state[i]
            result = train_als(train, params, user_factors=X, item_factors=Y, compute_loss=False, show_progress=False)
            state[i] = (result.user_factors, result.item_factors)
            metrics = ranking_metrics(
                result.user_factors,
                result.item_factors,
                train,
                valid,
                settings.k,
                settings.max_users,
                base.seed,
                percentile_ranks=False,
            )
            seconds = time.perf_counter() - t0
            per_iteration.append(seconds / params.iterations)
            rung_trials.append(
                Trial(
                    params.confidence,
                    params.alpha,
                    params.reg,
                    rung_index,
                    rung,
                    metrics.ndcg,
                    metrics.precision,
                    seconds,
                )
            )
            bar.update(params.iterations)
            elapsed = time.perf_counter() - started
            fit_s = float(np.median(per_iteration)) / share * max(1, base.iterations)
            if elapsed > settings.budget * fit_s * 1.25 and rung_index > 0:
                stopped_early = True
                break
        trials.extend(rung_trials)
        if stopped_early and len(rung_trials) < len(alive):
            log.warning("tuning stopped early at rung %d: over its time budget", rung_index)
            break  # (never at rung 0: the best of the last complete rung wins)
        last_complete = rung_trials
        ranked = sorted(range(len(alive)), key=lambda j: (-rung_trials[j].ndcg, -rung_trials[j].precision))
        alive = [alive[j] for j in ranked[: max(1, math.ceil(len(alive) / settings.eta))]]
        previous = rung
    bar.close()
    best = max(last_complete, key=lambda t: (t.ndcg, t.precision))
    choice = replace(base, confidence=best.confidence, alpha=best.alpha, reg=best.reg)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    work = sum(t.iterations - (rungs[t.rung - 1] if t.rung else 0) for t in trials) * share / max(1, base.iterations)
    log.info(
        "tuned in %.1f s (%.2f plain fits): %s alpha %g reg %g, validation NDCG@%d %.4f",
        seconds,
        work,
        choice.confidence,
        choice.alpha,
        choice.reg,
        settings.k,
        best.ndcg,
    )
    return TuneResult(
        choice=choice,
        trials=trials,
        seconds=seconds,
        work=work,
        budget=settings.budget,
        candidates=len(candidates),
        stopped_early=stopped_early,
        validation={"fraction": settings.validation, "pairs": int(valid.nnz), "k": settings.k, "rungs": list(rungs)},
    )
