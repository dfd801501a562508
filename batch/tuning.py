"""Self-tuning ALS: choose the confidence form, alpha, reg and its frequency scaling (`reg_exp` 0 or 1) on a
validation split of the training plays.

Every candidate is scored by NDCG@k (P@k breaks ties) on the validation split's held-out part after
training on its training part, *warm-started*: the given parameters are trained fully first, and each
candidate then trains `move_iterations` iterations from their factors. From a converged neighbour's factors
a few iterations tell candidates apart far better than the same iterations from a random start
(benchmarks/tuning_screen.py: Spearman 0.98 and 0.96 against fully trained candidates on the synthetic set
and a Last.fm subsample, 0.79 and 0.84 for 4 iterations from the seeded start, which successive halving's
first rung ranks by).
Two stages:

1. Screening: a coarse grid over the families (confidence form x reg_exp), each candidate warm-started
   from the given parameters' factors.
2. Refinement (pattern search) with the moves left (`TuneSettings.refine` of them): the 8 lattice neighbours of
   the best point so far (alpha and reg x or / `step`), warm-started from its factors; the first that beats
   it by REFINE_MIN_GAIN becomes the centre, and when none does the step shrinks. The optimum is sharp in
   reg on some data (synthetic P@10 0.137 at reg 100, 0.120 at 160), finer than any grid the budget affords.

The given parameters are scored too, and a choice must beat them. The validation split is carved from the
plays given (a caller that reports a holdout passes its training part only, so the holdout is never seen).

Cost: at most `budget` plain fits of work, evaluations included, planned from the data's shape (`WorkModel`,
in ALS iterations on the validation part), not from the clock: the same plays and settings give the same
trials and the same choice on any machine or load. The plan is the given parameters' fit plus a number of
moves (warm-started candidates); the screening takes `1 - refine` of them, the grid coarse to fine
(`coarse_to_fine`: every prefix spans all families), and the refinement the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from batch.als import AlsParams, AlsResult, train_als
from batch.evaluation import holdout_split, ranking_metrics

log = logging.getLogger(__name__)

#: The grid is coarse (x4 in alpha): the default budget affords ~6-12 warm-started screens (Last.fm 2K to
#: MovieLens 100K), and the refinement walks from the best of them at x2 and x1.41 steps.
#: log confidence: alpha x (reg / alpha). The best reg grows with alpha (docs/BENCHMARKS-als.md: Last.fm
#: near 20-25 x alpha, MovieLens 100K near 5-10 x alpha), so reg is searched relative to alpha.
LOG_ALPHAS = (0.5, 2.0, 8.0)
LOG_REG_PER_ALPHA = (3.0, 10.0, 30.0)
#: linear confidence: alpha x reg (binarised or light counts; the best linear alpha is tiny on music).
LINEAR_ALPHAS = (0.01, 0.1)
LINEAR_REGS = (10.0,)
#: frequency-scaled reg (`reg_exp` 1: lambda_u = reg * n_u, Rendle et al. 2021 / ALS-WR): reg is then per
#: play, so it is ~1/50 of the constant one (docs/BENCHMARKS-als.md: Last.fm best near 0.3 x alpha,
#: MovieLens 100K near 0.1 x alpha, both ~4-5% NDCG@10 above the best constant reg).
SCALED_LOG_ALPHAS = (0.5, 2.0, 8.0)
SCALED_LOG_REG_PER_ALPHA = (0.1, 0.3, 1.0)
SCALED_LINEAR_ALPHAS = (0.03,)
SCALED_LINEAR_REGS = (0.03,)


#: validation users scored per candidate: as many as fit EVALUATION_SCORES user x track scores (an
#: evaluation of 1,134 users x 17.6K tracks costs as much as ~4 training iterations on Last.fm 2K), at least
#: MIN_USERS, at most TuneSettings.max_users
MIN_USERS = 1_000
EVALUATION_SCORES = 20_000_000
#: WorkModel's calibration: a row's fixed cost in an iteration and a score's cost in an evaluation, in
#: non-zeros' cost; a training call's set-up, in iterations
ROW_WEIGHT = 2.4
EVALUATION_WEIGHT = 0.023
SETUP_ITERATIONS = 0.5
#: a refinement move must beat the centre's validation NDCG by this share (not chase evaluation noise)
REFINE_MIN_GAIN = 0.002
#: lattice moves around the centre (alpha factor, reg factor) for a step s: reg alone first (the sharpest
#: direction), then along reg / alpha (how the best reg grows with alpha), then alpha alone and across
REFINE_MOVES = ((0, -1), (0, 1), (1, 1), (-1, -1), (1, 0), (-1, 0), (1, -1), (-1, 1))


class TuningError(ValueError):
    """The plays cannot be tuned on as asked."""


@dataclass(frozen=True)
class TuneSettings:
    """How the search runs. budget: the most work it may take, in plain fits (WorkModel), evaluations
    included."""

    budget: float = 5.0
    validation: float = 0.2
    k: int = 10
    #: validation users scored per candidate, at most (fewer on large catalogues: EVALUATION_SCORES)
    max_users: int = 2_000
    #: warm-started iterations per candidate
    move_iterations: int = 4
    #: share of the moves (warm-started candidates) kept for the refinement (0: screening only)
    refine: float = 0.4
    #: lattice steps of the refinement (alpha and reg factors), coarse to fine
    refine_steps: tuple[float, ...] = (2.0, 2.0**0.5)

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise TuningError(f"the tuning budget must be > 0 plain fits, got {self.budget}")
        if not 0 < self.validation < 1:
            raise TuningError(f"the validation fraction must be between 0 and 1, got {self.validation}")
        if self.move_iterations < 1:
            raise TuningError(f"each candidate needs >= 1 iteration, got {self.move_iterations}")
        if not 0 <= self.refine < 1:
            raise TuningError(f"the refinement share must be in [0, 1), got {self.refine}")
        if any(not step > 1 for step in self.refine_steps):
            raise TuningError(f"refinement steps must be > 1, got {self.refine_steps}")


@dataclass
class Trial:
    """One candidate scored on the validation split. stage: "base" (the given parameters, fully trained),
    "screen" (warm-started from the base's factors) or "refine" (from the centre's); iterations: in all,
    behind its factors."""

    confidence: str
    alpha: float
    reg: float
    reg_exp: float
    stage: str
    iterations: int
    ndcg: float
    precision: float
    seconds: float

    def key(self) -> tuple[str, float, float, float]:
        return self.confidence, self.alpha, self.reg, self.reg_exp


@dataclass
class TuneResult:
    """The choice and every trial (`candidates` of them); `work` is the search's work in plain fits
    (WorkModel: training and evaluations), `seconds` its wall time."""

    choice: AlsParams
    trials: list[Trial]
    seconds: float
    work: float
    budget: float
    candidates: int
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
        points = [("log", a, a * r, 0.0) for a, r in _zigzag(LOG_ALPHAS, LOG_REG_PER_ALPHA)]
        points += [("linear", a, r, 0.0) for a, r in _zigzag(LINEAR_ALPHAS, LINEAR_REGS)]
        points += [("log", a, a * r, 1.0) for a, r in _zigzag(SCALED_LOG_ALPHAS, SCALED_LOG_REG_PER_ALPHA)]
        points += [("linear", a, r, 1.0) for a, r in _zigzag(SCALED_LINEAR_ALPHAS, SCALED_LINEAR_REGS)]
    points.append((base.confidence, base.alpha, base.reg, base.reg_exp))
    seen: set[tuple[str, float, float, float]] = set()
    out = []
    for confidence, alpha, reg, reg_exp in points:
        key = _key(confidence, alpha, reg, reg_exp)
        if key not in seen:
            seen.add(key)
            out.append(replace(base, confidence=confidence, alpha=key[1], reg=key[2], reg_exp=key[3]))
    return out


def _zigzag(alphas: tuple[float, ...], regs: tuple[float, ...]) -> list[tuple[float, float]]:
    """The alpha x reg lattice row by row, every other row reversed: so `thin` (every other point) keeps a
    checkerboard, not one reg column."""
    return [(a, r) for i, a in enumerate(alphas) for r in (regs if i % 2 == 0 else regs[::-1])]


def _key(confidence: str, alpha: float, reg: float, reg_exp: float) -> tuple[str, float, float, float]:
    return confidence, float(round(alpha, 9)), float(round(reg, 9)), float(reg_exp)


def coarse_to_fine(candidates: list[AlsParams], keep: AlsParams | None = None) -> list[AlsParams]:
    """`candidates` reordered so that every prefix spans the grid: the coarsest `thin` level first (one or
    two per family), then the points each finer level adds. A screening cut short by its budget keeps a
    spread, not the first families."""
    levels = [candidates]
    while len(levels[-1]) > 1 and len(coarser := thin(levels[-1], keep)) < len(levels[-1]):
        levels.append(coarser)
    ordered: list[AlsParams] = []
    for level in reversed(levels):
        ordered += [c for c in level if c not in ordered]
    return ordered


def thin(candidates: list[AlsParams], keep: AlsParams | None = None) -> list[AlsParams]:
    """Every other candidate of each family (confidence form x reg_exp), order kept, `keep` always kept: a
    thinner grid that still spans every family and, within one, a checkerboard of its lattice."""
    seen: dict[tuple[str, float], int] = {}
    out = []
    for c in candidates:
        n = seen.get((c.confidence, c.reg_exp), 0)
        seen[(c.confidence, c.reg_exp)] = n + 1
        if n % 2 == 0 or c == keep:
            out.append(c)
    return out


def tune(
    plays: sp.csr_matrix,
    base: AlsParams,
    settings: TuneSettings | None = None,
    timestamps: sp.csr_matrix | None = None,
    around: AlsParams | None = None,
    show_progress: bool = True,
) -> TuneResult:
    """Choose confidence, alpha, reg and reg_exp for `plays` (CSR users x tracks of counts); other fields of
    `base` (factors, iterations, solver, seed) are kept. `timestamps` (aligned with `plays`) make the
    validation split hold out each user's latest tracks; `around` warm-starts from a previous choice (its
    neighbours are screened instead of the grid)."""
    settings = settings or TuneSettings()
    started = time.perf_counter()
    plays = sp.csr_matrix(plays)
    try:
        train, valid = holdout_split(plays, settings.validation, seed=base.seed + 1, timestamps=timestamps)
    except ValueError as exc:
        raise TuningError(f"cannot carve a validation split from these plays: {exc}") from None
    if valid.nnz == 0:
        raise TuningError("no user has enough tracks for a validation split (at least 5 each): tune with more plays")
    users = min(settings.max_users, max(MIN_USERS, EVALUATION_SCORES // max(1, plays.shape[1])))
    search = _Search(train, valid, base, settings, users)
    base_key = _key(base.confidence, base.alpha, base.reg, base.reg_exp)

    # the work is planned from the data's shape, not the clock, so the same plays give the same choice
    cost = WorkModel(plays.shape, train.nnz, plays.nnz, users)
    left = settings.budget * cost.plain_fit(base.iterations) - cost.trial(base.iterations)
    moves = max(0, int(left // cost.trial(search.move_iterations)))
    keep = None if around is None else replace(base, **_point(around))  # (a warm start keeps its centre)
    grid = [c for c in candidate_grid(base, around) if _key(c.confidence, c.alpha, c.reg, c.reg_exp) != base_key]
    screens = round((1 - settings.refine) * moves)
    grid = coarse_to_fine(grid, keep)[:screens]
    log.info(
        "tuning on %d validation pairs (%d users scored): %d moves of %d iterations in a budget of %.1f plain "
        "fits (an evaluation ~%.1f iterations): %d screened, coarse to fine, the rest refining",
        valid.nnz,
        users,
        moves,
        search.move_iterations,
        settings.budget,
        cost.evaluation,
        len(grid),
    )

    # the given parameters, fully trained: the reference a choice must beat and every screen's start
    reference, factors = search.score(base, base.iterations, "base")
    best, best_factors = reference, factors
    for params in tqdm(grid, desc="tune", unit="cand", disable=not show_progress):
        trial, fit = search.score(params, base.iterations + search.move_iterations, "screen", factors)
        if (trial.ndcg, trial.precision) > (best.ndcg, best.precision):
            best, best_factors = trial, fit
    if best is not reference and not best.ndcg > reference.ndcg * (1 + REFINE_MIN_GAIN):
        best, best_factors = reference, factors  # (within noise of the given parameters: keep them)
    best = search.refine(best, best_factors, moves - len(grid))
    choice = replace(base, confidence=best.confidence, alpha=best.alpha, reg=best.reg, reg_exp=best.reg_exp)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    work = sum(cost.trial(run) for run in search.runs) / cost.plain_fit(base.iterations)
    log.info(
        "tuned in %.1f s (%.1f plain fits of work, %d candidates): %s alpha %g reg %g reg_exp %g, "
        "validation NDCG@%d %.4f (given parameters %.4f)",
        seconds,
        work,
        len(search.trials),
        choice.confidence,
        choice.alpha,
        choice.reg,
        choice.reg_exp,
        settings.k,
        best.ndcg,
        reference.ndcg,
    )
    return TuneResult(
        choice=choice,
        trials=search.trials,
        seconds=seconds,
        work=work,
        budget=settings.budget,
        candidates=len(search.trials),
        validation={
            "fraction": settings.validation,
            "pairs": int(valid.nnz),
            "k": settings.k,
            "users": users,
            "move_iterations": search.move_iterations,
            "refine_share": settings.refine,
            "refine_moves": sum(t.stage == "refine" for t in search.trials),
        },
        around=around,
    )


#: root mean square of the seeded start (uniform in [0, 0.01): batch.als.initial_factors)
_START_RMS = 0.01 / 3**0.5


def _lifted(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warm-start factors, scaled up to at least the seeded start's size: a heavily regularised fit
    collapses towards 0, and ALS grows back from there only slowly (each half-step scales by ~ signal /
    reg), so a candidate started from it would be scored unfairly low."""
    rms = float(np.sqrt(np.mean(np.square(Y, dtype=np.float64)))) if Y.size else 0.0
    if rms >= _START_RMS or rms == 0.0:
        return X, Y
    scale = np.float32(_START_RMS / rms)
    return X * scale, Y * scale


@dataclass(frozen=True)
class WorkModel:
    """The search's work in units of one ALS iteration on the validation split's training part, from the
    data's shape. An iteration costs ~ non-zeros + ROW_WEIGHT x rows (users + tracks: each row's CG solve
    has a fixed part); an evaluation ~ EVALUATION_WEIGHT x users x tracks scored (the product and the
    top-k passes over the scores); each training call adds SETUP_ITERATIONS (confidence matrix, transpose).
    Calibrated at 40 factors and CG 3 on this project's 2-core machine against Last.fm 2K, MovieLens 100K
    and the synthetic set (iterations 0.013-0.023 s, evaluations 4.5-5.3 ns per score:
    docs/BENCHMARKS-als.md); other machines differ in seconds, not much in these ratios."""

    shape: tuple[int, int]
    train_nnz: int
    all_nnz: int
    users: int

    def _iteration(self, nnz: int) -> float:
        return nnz + ROW_WEIGHT * (self.shape[0] + self.shape[1])

    @property
    def evaluation(self) -> float:
        """One validation evaluation, in iterations."""
        return EVALUATION_WEIGHT * min(self.users, self.shape[0]) * self.shape[1] / self._iteration(self.train_nnz)

    def trial(self, iterations: int) -> float:
        """One trial: a training call of `iterations` and its evaluation, in iterations."""
        return iterations + SETUP_ITERATIONS + self.evaluation

    def plain_fit(self, iterations: int) -> float:
        """One plain fit (`iterations` on all plays, one set-up), in iterations on the training part."""
        full = self._iteration(self.all_nnz) / self._iteration(self.train_nnz)
        return (max(1, iterations) + SETUP_ITERATIONS) * full


class _Search:
    """The trials so far and how to score one more (warm-started training + validation metrics)."""

    def __init__(self, train: sp.csr_matrix, valid: sp.csr_matrix, base: AlsParams, settings: TuneSettings, users: int):
        self.train, self.valid, self.base, self.settings, self.users = train, valid, base, settings, users
        self.trials: list[Trial] = []
        self.runs: list[int] = []  # the iterations each trial trained
        #: warm-started iterations per candidate: at most half the given parameters' own
        self.move_iterations = min(settings.move_iterations, max(1, base.iterations // 2))

    @property
    def tried(self) -> set[tuple[str, float, float, float]]:
        return {t.key() for t in self.trials}

    def score(
        self, params: AlsParams, iterations: int, stage: str, start: AlsResult | None = None
    ) -> tuple[Trial, AlsResult]:
        """Train `params` (`move_iterations` from `start`'s factors, or `params.iterations` from the seeded
        start) and score it; the trial is recorded."""
        run = params if start is None else replace(params, iterations=self.move_iterations)
        t0 = time.perf_counter()
        X, Y = (None, None) if start is None else _lifted(start.user_factors, start.item_factors)
        fit = train_als(self.train, run, user_factors=X, item_factors=Y, compute_loss=False, show_progress=False)
        m = ranking_metrics(
            fit.user_factors,
            fit.item_factors,
            self.train,
            self.valid,
            self.settings.k,
            self.users,
            self.base.seed,
            percentile_ranks=False,
        )
        self.runs.append(run.iterations)
        key = _key(params.confidence, params.alpha, params.reg, params.reg_exp)
        trial = Trial(*key, stage, iterations, m.ndcg, m.precision, time.perf_counter() - t0)
        self.trials.append(trial)
        return trial, fit

    def refine(self, centre: Trial, factors: AlsResult, moves: int) -> Trial:
        """Pattern search around `centre` (`factors` its fit), at most `moves` trials: each lattice neighbour
        not tried yet trains from the centre's factors; the first that beats it by REFINE_MIN_GAIN becomes
        the centre; when none does the step shrinks. Returns the last centre."""
        for step in self.settings.refine_steps:
            moved = True
            while moved:
                moved = False
                for fa, fr in REFINE_MOVES:
                    key = _key(centre.confidence, centre.alpha * step**fa, centre.reg * step**fr, centre.reg_exp)
                    if key in self.tried:
                        continue
                    if moves <= 0:
                        return centre
                    moves -= 1
                    confidence, alpha, reg, reg_exp = key
                    params = replace(self.base, confidence=confidence, alpha=alpha, reg=reg, reg_exp=reg_exp)  # type: ignore[arg-type]
                    trial, fit = self.score(params, centre.iterations + self.move_iterations, "refine", factors)
                    if trial.ndcg > centre.ndcg * (1 + REFINE_MIN_GAIN):
                        log.info(
                            "tuning: refinement moved to %s alpha %g reg %g reg_exp %g (validation NDCG %.4f > %.4f)",
                            *key,
                            trial.ndcg,
                            centre.ndcg,
                        )
                        centre, factors, moved = trial, fit, True
                        break
        return centre
