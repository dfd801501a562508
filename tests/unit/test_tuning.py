"""Self-tuning ALS (batch.tuning): successive halving on a validation split of the training plays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from batch.als import AlsParams, train_als
from batch.evaluation import holdout_split, ranking_metrics
from batch.tuning import TuneSettings, TuningError, candidate_grid, coarse_to_fine, tune
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
    result = tune(train, bad, TuneSettings(budget=30), show_progress=False)
    assert result.choice.reg < bad.reg
    assert (result.choice.factors, result.choice.iterations, result.choice.seed) == (8, 6, 0)  # kept from base

    def test_ndcg(params: AlsParams) -> float:
        fit = train_als(train, params, show_progress=False)
        return ranking_metrics(fit.user_factors, fit.item_factors, train, test, 10).ndcg

    assert test_ndcg(result.choice) > 1.5 * test_ndcg(bad)


def test_every_candidate_is_screened_warm_started_and_the_refinement_walks_from_the_best() -> None:
    from batch.tuning import REFINE_MIN_GAIN, REFINE_MOVES

    plays = planted_plays(seed=1)
    base = AlsParams(factors=8, iterations=6)
    settings = TuneSettings(budget=400)  # (time for all: the walk runs until no neighbour is better)
    result = tune(plays, base, settings, show_progress=False)
    stages = [t.stage for t in result.trials]
    assert stages[0] == "base" and set(stages) == {"base", "screen", "refine"}
    assert stages == sorted(stages, key=["base", "screen", "refine"].index)  # base, then screens, then moves
    grid = coarse_to_fine([p for p in candidate_grid(base) if p != base])
    screened = [t for t in result.trials if t.stage == "screen"]
    assert [t.key() for t in screened] == [(p.confidence, p.alpha, p.reg, p.reg_exp) for p in grid]
    assert all(t.iterations == 6 + 3 for t in screened)  # warm-started: half the base's iterations more
    assert len({t.key() for t in result.trials}) == len(result.trials)  # nothing is tried twice

    # replay the walk: it starts from the best screen (if it beats the base by the margin); each move is the
    # next untried lattice neighbour of the centre at the current step; one that beats the centre by the
    # margin becomes the centre; the step shrinks only when every neighbour was tried
    reference = result.trials[0]
    centre = max(screened, key=lambda t: (t.ndcg, t.precision))
    centre = centre if centre.ndcg > reference.ndcg * (1 + REFINE_MIN_GAIN) else reference
    tried = {t.key() for t in result.trials if t.stage != "refine"}
    steps = list(settings.refine_steps)

    def neighbours(c, step: float) -> list[tuple]:
        return [
            (c.confidence, round(c.alpha * step**fa, 9), round(c.reg * step**fr, 9), c.reg_exp)
            for fa, fr in REFINE_MOVES
        ]

    for t in (t for t in result.trials if t.stage == "refine"):
        while set(neighbours(centre, steps[0])) <= tried:
            steps.pop(0)
        assert t.key() == next(n for n in neighbours(centre, steps[0]) if n not in tried)
        assert t.iterations == centre.iterations + 3
        tried.add(t.key())
        if t.ndcg > centre.ndcg * (1 + REFINE_MIN_GAIN):
            centre = t
    c = result.choice
    assert (c.confidence, c.alpha, c.reg, c.reg_exp) == centre.key()
    assert set(neighbours(centre, settings.refine_steps[-1])) <= tried  # it stopped at a local best
    record = result.to_dict()
    assert json.loads(json.dumps(record)) == record  # manifest-ready
    assert len(record["trials"]) == len(result.trials)
    assert record["validation"]["refine_moves"] == stages.count("refine")


def test_the_budget_plans_the_moves_from_the_data_shape_so_a_rerun_makes_the_same_choice() -> None:
    from batch.tuning import WorkModel

    plays = planted_plays(seed=2)
    base = AlsParams(factors=4, iterations=15)
    small, large = TuneSettings(budget=2.0), TuneSettings(budget=6.0)
    result = tune(plays, base, small, show_progress=False)
    grid = coarse_to_fine([p for p in candidate_grid(base) if p != base])
    screened = [t.key() for t in result.trials if t.stage == "screen"]
    assert 0 < len(screened) < len(grid)  # a prefix of the coarse-to-fine order: a spread over the families
    assert screened == [(p.confidence, p.alpha, p.reg, p.reg_exp) for p in grid[: len(screened)]]
    assert result.work <= small.budget
    assert len(tune(plays, base, large, show_progress=False).trials) > len(result.trials)
    again = tune(plays, base, small, show_progress=False)
    strip = lambda r: [(t.key(), t.stage, t.iterations, t.ndcg) for t in r.trials]  # noqa: E731
    assert strip(again) == strip(result) and again.choice == result.choice  # not the clock: the same plan
    # the model: a plain fit on all plays costs more than its iterations on the smaller training part
    model = WorkModel((1000, 5000), train_nnz=8000, all_nnz=10000, users=1000)
    assert model.plain_fit(20) > 20 and model.evaluation > 0


def test_the_screening_order_spans_every_family_first() -> None:
    grid = candidate_grid(AlsParams())
    ordered = coarse_to_fine(grid)
    assert sorted(map(repr, ordered)) == sorted(map(repr, grid))  # a permutation
    families = {(p.confidence, p.reg_exp) for p in grid}
    assert {(p.confidence, p.reg_exp) for p in ordered[: len(families)]} == families
    log_constant = [(p.alpha, p.reg / p.alpha) for p in ordered if (p.confidence, p.reg_exp) == ("log", 0.0)]
    assert len({a for a, _ in log_constant[:4]}) >= 2 and len({r for _, r in log_constant[:4]}) >= 2  # a spread


def test_a_warm_start_searches_the_previous_choice_and_its_neighbours() -> None:
    previous = AlsParams(confidence="log", alpha=2.0, reg=20.0)
    grid = candidate_grid(AlsParams(), around=previous)
    points = {(p.confidence, p.alpha, p.reg) for p in grid}
    assert ("log", 2.0, 20.0) in points and ("log", 1.0, 40.0) in points and ("log", 4.0, 10.0) in points
    assert len(points) == 9  # (the default base coincides with the previous choice here)
    assert {p.reg_exp for p in grid} == {0.0}
    scaled = candidate_grid(AlsParams(), around=AlsParams(alpha=1.0, reg=0.3, reg_exp=1.0))
    assert {p.reg_exp for p in scaled if p != AlsParams()} == {1.0} and len(scaled) == 10


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
    constant = [p for p in grid if p.reg_exp == 0.0 and p.confidence == "log"]
    # per play: far below the constant reg at the same alpha
    assert max(p.reg / p.alpha for p in scaled if p.confidence == "log") < min(p.reg / p.alpha for p in constant)
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
    screened = {t.key() for t in searched.trials if t.stage == "screen"}
    assert screened <= {(p.confidence, p.alpha, p.reg, p.reg_exp) for p in candidate_grid(base, around=around)}
    assert {t.reg_exp for t in searched.trials} == {0.0, 1.0}  # (the base's constant reg, the rest scaled)
