"""Self-tuning ALS (batch.tuning): successive halving on a validation split of the training plays."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from batch.als import AlsParams, train_als
from batch.evaluation import holdout_split, ranking_metrics
from batch.tuning import TuneSettings, TuningError, candidate_grid, plan_iterations, tune
from playrec.cli import main


def planted_plays(n_users: int = 400, n_items: int = 240, groups: int = 8, seed: int = 0) -> sp.csr_matrix:
    """Users in `groups` taste groups, each streaming ~15 tracks of its group's block and 3 at random
    (heavy-tailed counts): what a good model recovers and an over-regularised one does not."""
    rng = np.random.default_rng(seed)
    block = n_items // groups
    rows, cols = [], []
    for u in range(n_users):
        g = u % groups
        own = rng.choice(block, 15, replace=False) + g * block
        rows += [u] * 18
        cols += [*own.tolist(), *rng.integers(0, n_items, 3).tolist()]
    counts = np.ceil(rng.pareto(1.2, len(rows)) + 1).astype(np.float32)
    plays = sp.csr_matrix((counts, (rows, cols)), shape=(n_users, n_items), dtype=np.float32)
    plays.sum_duplicates()
    return plays


def test_the_tuned_choice_beats_a_bad_starting_point_on_plays_it_never_saw() -> None:
    plays = planted_plays()
    train, test = holdout_split(plays, 0.2, seed=0)
    bad = AlsParams(factors=8, iterations=6, alpha=2.0, reg=5000.0)
    result = tune(train, bad, TuneSettings(rungs=(2, 6)), show_progress=False)
    assert result.choice.reg < bad.reg
    assert (result.choice.factors, result.choice.iterations, result.choice.seed) == (8, 6, 0)  # kept from base

    def test_ndcg(params: AlsParams) -> float:
        fit = train_als(train, params, show_progress=False)
        return ranking_metrics(fit.user_factors, fit.item_factors, train, test, 10).ndcg

    assert test_ndcg(result.choice) > 1.5 * test_ndcg(bad)


def test_successive_halving_keeps_the_best_third_and_chooses_the_best_of_the_last_rung() -> None:
    plays = planted_plays(seed=1)
    base = AlsParams(factors=8, iterations=6)
    result = tune(plays, base, TuneSettings(rungs=(1, 3, 6), budget=100), show_progress=False)
    by_rung = [[t for t in result.trials if t.rung == r] for r in range(3)]
    base_key = (base.confidence, base.alpha, base.reg, base.reg_exp)
    for lower, upper in itertools.pairwise(by_rung):
        # the best third goes on, and the given parameters always do
        best_below = sorted(lower, key=lambda t: (-t.ndcg, -t.precision))[: -(-len(lower) // 3)]
        assert {t.key() for t in upper} == {t.key() for t in best_below} | {base_key}
    assert len(by_rung[0]) == result.candidates
    best = max(by_rung[-1], key=lambda t: (t.ndcg, t.precision))
    c = result.choice
    assert (c.confidence, c.alpha, c.reg, c.reg_exp) == best.key()
    assert [t.iterations for t in by_rung[-1]] == [6] * len(by_rung[-1])
    record = result.to_dict()
    assert json.loads(json.dumps(record)) == record  # manifest-ready
    assert len(record["trials"]) == len(result.trials)


def test_a_small_budget_thins_the_grid_to_fit() -> None:
    plays = planted_plays(seed=2)
    base = AlsParams(factors=4, iterations=15)
    settings = TuneSettings(budget=2.0)
    result = tune(plays, base, settings, show_progress=False)
    assert result.candidates < len(candidate_grid(base))
    assert result.work <= settings.budget
    assert any(t.key() == (base.confidence, base.alpha, base.reg, base.reg_exp) for t in result.trials)  # base tried


def test_a_warm_start_searches_the_previous_choice_and_its_neighbours() -> None:
    previous = AlsParams(confidence="log", alpha=2.0, reg=20.0)
    grid = candidate_grid(AlsParams(), around=previous)
    points = {(p.confidence, p.alpha, p.reg) for p in grid}
    assert ("log", 2.0, 20.0) in points and ("log", 1.0, 40.0) in points and ("log", 4.0, 10.0) in points
    assert len(points) == 9  # (the default base coincides with the previous choice here)
    assert {p.reg_exp for p in grid} == {0.0}
    scaled = candidate_grid(AlsParams(), around=AlsParams(alpha=1.0, reg=0.3, reg_exp=1.0))
    assert {p.reg_exp for p in scaled if p != AlsParams()} == {1.0} and len(scaled) == 10
    assert plan_iterations(9, (4, 10, 20), 3) == 9 * 4 + 4 * 6 + 3 * 10  # (the base may go on beside the best)


def test_the_validation_metrics_without_percentile_ranks_match_the_full_evaluation() -> None:
    plays = planted_plays(seed=3)
    train, valid = holdout_split(plays, 0.2, seed=1)
    fit = train_als(train, AlsParams(factors=8, iterations=4), show_progress=False)
    quick = ranking_metrics(fit.user_factors, fit.item_factors, train, valid, 10, percentile_ranks=False)
    ndcg, precision = quick.ndcg, quick.precision
    full = ranking_metrics(fit.user_factors, fit.item_factors, train, valid, 10)
    assert ndcg == pytest.approx(full.ndcg, rel=1e-6) and precision == pytest.approx(full.precision, rel=1e-6)


def test_plays_too_thin_to_validate_on_are_a_clear_error() -> None:
    thin = sp.csr_matrix(np.eye(20, dtype=np.float32))  # one track per user: nothing to hold out
    with pytest.raises(TuningError, match="validation"):
        tune(thin, AlsParams(factors=2, iterations=2), show_progress=False)
    with pytest.raises(TuningError, match="budget"):
        TuneSettings(budget=0)


def test_train_tune_records_every_trial_and_publishes_the_choice(tmp_path, capsys) -> None:
    plays = planted_plays(seed=4).tocoo()
    path = tmp_path / "plays.tsv"
    rows = [f"user{u}\ttrack-{i}\t{int(c)}" for u, i, c in zip(plays.row, plays.col, plays.data, strict=True)]
    path.write_text("user\ttrack\tplays\n" + "\n".join(rows) + "\n")
    store = tmp_path / "store"
    args = ["train", "--plays", str(path), "--out", str(store), "--factors", "8", "--iterations", "4"]
    assert main([*args, "--tune", "--no-progress", "--no-index"]) == 0
    out = capsys.readouterr().out
    assert "tuned in" in out
    version = (store / "models" / "CURRENT").read_text().strip()
    manifest = json.loads((store / "models" / version / "manifest.json").read_text())
    tuning = manifest["training"]["tuning"]
    assert tuning["trials"] and tuning["candidates"] >= 2
    chosen = {k: manifest["parameters"][k] for k in ("confidence", "alpha", "reg", "reg_exp")}
    assert chosen == tuning["choice"]
    assert "tune_s" in manifest["training"]["timings"]


def test_the_full_grid_searches_constant_and_frequency_scaled_reg() -> None:
    grid = candidate_grid(AlsParams())
    scaled = [p for p in grid if p.reg_exp == 1.0]
    assert scaled and {p.confidence for p in scaled} == {"log", "linear"}
    assert all(p.reg < 5 for p in scaled)  # per play: far below the constant reg
    assert len({(p.confidence, p.alpha, p.reg, p.reg_exp) for p in grid}) == len(grid)


def test_a_retrain_warm_starts_around_a_tuned_live_model_only() -> None:
    from batch.model_store import Model
    from batch.retrain import warm_start

    def model(training: dict) -> Model:
        chosen = AlsParams(alpha=1.0, reg=0.3, reg_exp=1.0, factors=8)
        empty = np.zeros((0, 8), np.float32)
        manifest = {"parameters": chosen.to_dict(), "training": training}
        return Model("v1", Path(), manifest, np.array([]), np.array([]), empty, empty)

    assert warm_start(None) is None
    assert warm_start(model({})) is None  # not chosen by a search: the next one searches the full grid
    around = warm_start(model({"tuning": {"choice": {"alpha": 1.0}}}))
    assert around == AlsParams(alpha=1.0, reg=0.3, reg_exp=1.0, factors=8)
    grid = candidate_grid(AlsParams(), around=around)
    assert len(grid) == 10 and {(p.alpha, p.reg) for p in grid if p.reg_exp == 1.0} >= {(0.5, 0.15), (2.0, 0.6)}
    base = AlsParams(factors=8, iterations=4)
    searched = tune(planted_plays(seed=5), base, TuneSettings(budget=20), around=around, show_progress=False)
    assert searched.to_dict()["warm_start"] == {"confidence": "log", "alpha": 1.0, "reg": 0.3, "reg_exp": 1.0}
    assert {t.reg_exp for t in searched.trials} <= {0.0, 1.0} and searched.candidates <= 10


def test_the_plan_is_thinned_to_the_time_left_evaluations_included() -> None:
    from batch.tuning import _thin_to_time, plan_evaluations

    grid = candidate_grid(AlsParams())
    base = AlsParams()
    rungs = (4, 10, 20)
    assert plan_evaluations(27, rungs, 3) == 27 + 10 + 5
    # training alone fits 60 s; evaluations of 2 s each do not: the plan is thinned until both fit
    kept_cheap = _thin_to_time(grid, base, rungs, 3, iteration_s=0.1, evaluation_s=0.0, seconds_left=60)
    kept = _thin_to_time(grid, base, rungs, 3, iteration_s=0.1, evaluation_s=2.0, seconds_left=60)
    assert len(kept) < len(kept_cheap) <= len(grid)
    rest = (plan_iterations(len(kept), rungs, 3) - 4) * 0.1 + (plan_evaluations(len(kept), rungs, 3) - 1) * 2.0
    assert rest <= 60 and kept[0] == grid[0] and base in kept  # the tried first and the base stay
