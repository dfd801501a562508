"""Self-tuning ALS: choose the confidence form, alpha, reg and its frequency scaling (`reg_exp` 0 or 1) on a
validation split of the training plays.

Successive halving (Jamieson & Talwalkar 2016) over a grid: every candidate trains a few iterations from
the same seeded start on the validation split's training part and is ranked by NDCG@k on its held-out
part (P@k breaks ties); the best third trains on from where it stopped, and so on, until the last rung
(`rungs[-1]` iterations in all) names the choice. The validation split is carved from the plays given
(a caller that reports a holdout passes its training part only, so the reported holdout is never seen).

Cost: `budget` plain fits of wall time (`base.iterations` iterations on all plays, estimated from the
search's own training iterations: one on the validation part counts as its share of the non-zeros),
evaluations included. A plan over budget in iterations alone is thinned (every other candidate) before it
starts; once the first candidate's training and evaluation times are measured, the rest of the plan is
thinned again to fit the time left; and the wall clock stops a later rung early if it still runs over
(the best of the last completed rung wins).
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
#: frequency-scaled reg (`reg_exp` 1: lambda_u = reg * n_u, Rendle et al. 2021 / ALS-WR): reg is then per
#: play, so it is ~1/50 of the constant one (docs/BENCHMARKS-als.md: Last.fm best near 0.3 x alpha,
#: MovieLens 100K near 0.1 x alpha, both ~4-5% NDCG@10 above the best constant reg).
SCALED_LOG_ALPHAS = (0.5, 1.0, 2.0, 4.0)
SCALED_LOG_REG_PER_ALPHA = (0.1, 0.3, 1.0)
SCALED_LINEAR_ALPHAS = (0.03, 0.3)
SCALED_LINEAR_REGS = (0.03, 0.1)


#: users scored at the early rungs: as many as fit EARLY_RUNG_SCORES user x track scores (all of a small
#: catalogue's validation users), at least MIN_RUNG_USERS
MIN_RUNG_USERS = 500
EARLY_RUNG_SCORES = 10_000_000


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
    #: validation users scored at the last rung; the early rungs score fewer on large catalogues
    #: (EARLY_RUNG_SCORES): they only drop the clearly worse two thirds, and an evaluation of 2,000 users x
    #: 17.6K tracks costs as much as ~9 training iterations on Last.fm 2K
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
    reg_exp: float
    rung: int
    iterations: int
    ndcg: float
    precision: float
    seconds: float

    def key(self) -> tuple[str, float, float, float]:
        return self.confidence, self.alpha, self.reg, self.reg_exp


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
    #: the previous choice the grid was centred on (retrain warm start); None: the full grid
    around: AlsParams | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `training.tuning` (json-serialisable)."""
        best = _point(self.choice)
        return {
            "choice": best,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 3),
            "work_fits": round(self.work, 3),
            "budget_fits": self.budget,
            "stopped_early": self.stopped_early,
            "warm_start": None if self.around is None else _point(self.around),
            "validation": self.validation,
            "trials": [asdict(t) for t in self.trials],
        }


def _point(p: AlsParams) -> dict[str, Any]:
    return {"confidence": p.confidence, "alpha": p.alpha, "reg": p.reg, "reg_exp": p.reg_exp}


def candidate_grid(base: AlsParams, around: AlsParams | None = None) -> list[AlsParams]:
    """The candidates: the full grid (constant and frequency-scaled reg), or with `around` (a previous
    choice: warm start) its neighbours (alpha and reg x 1/2, 1, 2, same confidence form and reg_exp).
    Always includes `base` itself."""
    if around is not None:
        points = [
            (around.confidence, around.alpha * fa, around.reg * fr, around.reg_exp)
            for fa in (0.5, 1.0, 2.0)
            for fr in (0.5, 1.0, 2.0)
        ]
    else:
        points = [("log", a, a * r, 0.0) for a in LOG_ALPHAS for r in LOG_REG_PER_ALPHA]
        points += [("linear", a, r, 0.0) for a in LINEAR_ALPHAS for r in LINEAR_REGS]
        points += [("log", a, a * r, 1.0) for a in SCALED_LOG_ALPHAS for r in SCALED_LOG_REG_PER_ALPHA]
        points += [("linear", a, r, 1.0) for a in SCALED_LINEAR_ALPHAS for r in SCALED_LINEAR_REGS]
    points.append((base.confidence, base.alpha, base.reg, base.reg_exp))
    seen: set[tuple[str, float, float, float]] = set()
    out = []
    for confidence, alpha, reg, reg_exp in points:
        key = _key(confidence, alpha, reg, reg_exp)
        if key not in seen:
            seen.add(key)
            out.append(replace(base, confidence=confidence, alpha=key[1], reg=key[2], reg_exp=key[3]))
    return out


def _key(confidence: str, alpha: float, reg: float, reg_exp: float) -> tuple[str, float, float, float]:
    return confidence, float(round(alpha, 9)), float(round(reg, 9)), float(reg_exp)


def _thin_to_time(
    candidates: list[AlsParams],
    keep_base: AlsParams,
    rungs: tuple[int, ...],
    eta: int,
    iteration_s: float,
    evaluation_s: float,
    seconds_left: float,
) -> list[AlsParams]:
    """`candidates` (the first already tried at rung 0) thinned, every other one after the first, until
    the rest of the plan (iterations and evaluations, at the measured costs) fits `seconds_left`."""

    def seconds(n: int) -> float:
        rest = plan_iterations(n, rungs, eta) - rungs[0]
        return rest * iteration_s + (plan_evaluations(n, rungs, eta) - 1) * evaluation_s

    while len(candidates) > 2 and seconds(len(candidates)) > seconds_left:
        first, rest = candidates[0], candidates[1:][::2]
        if keep_base != first and keep_base not in rest:
            rest.append(keep_base)
        if len(rest) + 1 >= len(candidates):
            break  # (three left, the base among them: nothing more to drop)
        candidates = [first, *rest]
    return candidates


def plan_evaluations(n: int, rungs: tuple[int, ...], eta: int) -> int:
    """Validation evaluations successive halving runs on `n` candidates."""
    total = 0
    for _ in rungs:
        total += n
        n = math.ceil(n / eta) + 1  # (an upper bound: the given parameters go on too)
    return total


def plan_iterations(n: int, rungs: tuple[int, ...], eta: int) -> int:
    """Validation iterations successive halving spends on `n` candidates."""
    total, previous = 0, 0
    for rung in rungs:
        total += n * (rung - previous)
        previous, n = rung, math.ceil(n / eta) + 1  # (an upper bound: the given parameters go on too)
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
    base_key = _key(base.confidence, base.alpha, base.reg, base.reg_exp)
    keep_base = next(c for c in candidates if (c.confidence, c.alpha, c.reg, c.reg_exp) == base_key)
    while len(candidates) > 2 and plan_iterations(len(candidates), rungs, settings.eta) > allowed:
        thinned = candidates[::2] if keep_base in candidates[::2] else [*candidates[::2], keep_base]
        if len(thinned) >= len(candidates):
            break  # (three left, the base among them: nothing more to drop)
        candidates = thinned
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
    # early rungs score fewer users when an evaluation is large (users x tracks), never under MIN_RUNG_USERS
    cheap = max(MIN_RUNG_USERS, EARLY_RUNG_SCORES // max(1, plays.shape[1]))
    rung_users = [min(settings.max_users, cheap) for _ in rungs[:-1]] + [settings.max_users]
    trials: list[Trial] = []
    state: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
    alive = list(range(len(candidates)))
    previous = 0
    train_per_iteration: list[float] = []
    evaluation_s: list[float] = []
    stopped_early = False
    bar = tqdm(total=planned, desc="tune", unit="it", disable=not show_progress)
    last_complete: list[Trial] = []
    for rung_index, rung in enumerate(rungs):
        rung_trials: list[Trial] = []
        position = 0
        while position < len(alive):
            i = alive[position]
            params = replace(candidates[i], iterations=rung - previous)
            t0 = time.perf_counter()
            X, Y = state.get(i, (None, None))
            result = train_als(train, params, user_factors=X, item_factors=Y, compute_loss=False, show_progress=False)
            state[i] = (result.user_factors, result.item_factors)
            t1 = time.perf_counter()
            metrics = ranking_metrics(
                result.user_factors,
                result.item_factors,
                train,
                valid,
                settings.k,
                rung_users[rung_index],
                base.seed,
                percentile_ranks=False,
            )
            t2 = time.perf_counter()
            train_per_iteration.append((t1 - t0) / params.iterations)
            evaluation_s.append(t2 - t1)
            rung_trials.append(
                Trial(
                    params.confidence,
                    params.alpha,
                    params.reg,
                    params.reg_exp,
                    rung_index,
                    rung,
                    metrics.ndcg,
                    metrics.precision,
                    t2 - t0,
                )
            )
            bar.update(params.iterations)
            position += 1
            # the budget is wall time: `budget` plain fits (estimated from the training iterations so far),
            # evaluations included
            fit_s = float(np.median(train_per_iteration)) / share * max(1, base.iterations)
            limit = settings.budget * fit_s
            if rung_index == 0 and position == 1:  # first costs known: thin the rest of the plan to fit
                it_s, eval_s = float(np.median(train_per_iteration)), float(np.median(evaluation_s))
                kept = _thin_to_time(
                    candidates, keep_base, rungs, settings.eta, it_s, eval_s, limit - (time.perf_counter() - started)
                )
                if len(kept) < len(candidates):
                    log.info(
                        "tuning: %d of %d candidates fit the budget (%.2f s per evaluation, %.3f s per iteration)",
                        len(kept),
                        len(candidates),
                        eval_s,
                        it_s,
                    )
                    bar.total = plan_iterations(len(kept), rungs, settings.eta)
                    candidates, alive = kept, list(range(len(kept)))
            if time.perf_counter() - started > limit and rung_index > 0:
                stopped_early = True
                break
        trials.extend(rung_trials)
        if stopped_early and len(rung_trials) < len(alive):
            log.warning("tuning stopped early at rung %d: over its time budget", rung_index)
            break  # (never at rung 0: the best of the last complete rung wins)
        last_complete = rung_trials
        ranked = sorted(range(len(alive)), key=lambda j: (-rung_trials[j].ndcg, -rung_trials[j].precision))
        survivors = [alive[j] for j in ranked[: max(1, math.ceil(len(alive) / settings.eta))]]
        # the given parameters always reach the last rung: a choice must beat them fully trained (a high reg
        # converges slower and ranks low after a few iterations only)
        base_index = candidates.index(keep_base)
        alive = survivors if base_index in survivors or base_index not in alive else [*survivors, base_index]
        previous = rung
    bar.close()
    best = max(last_complete, key=lambda t: (t.ndcg, t.precision))
    choice = replace(base, confidence=best.confidence, alpha=best.alpha, reg=best.reg, reg_exp=best.reg_exp)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    work = sum(t.iterations - (rungs[t.rung - 1] if t.rung else 0) for t in trials) * share / max(1, base.iterations)
    log.info(
        "tuned in %.1f s (%.2f plain fits): %s alpha %g reg %g reg_exp %g, validation NDCG@%d %.4f",
        seconds,
        work,
        choice.confidence,
        choice.alpha,
        choice.reg,
        choice.reg_exp,
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
        validation={
            "fraction": settings.validation,
            "pairs": int(valid.nnz),
            "k": settings.k,
            "rungs": list(rungs),
            "users_per_rung": rung_users,
        },
        around=around,
    )
