"""Frequency-scaled regularisation (`AlsParams.reg_exp`): lambda_u = reg * n_u ** reg_exp in every solver,
the loss, and fold-in (which must stay the exact half-step under it)."""

import numpy as np
import pytest
import scipy.sparse as sp

from batch.als import AlsParams, AlsParamsError, hu_loss, train_als
from batch.confidence import confidence_matrix, confidence_minus_one
from batch.foldin import fold_in_items, fold_in_users
from batch.solvers import half_step, row_regularisation

from .synthetic import random_plays
from .test_als import reference_half_step, small_problem


@pytest.fixture
def problem():
    return small_problem()


def test_row_regularisation_scales_with_the_rows_plays():
    got = row_regularisation(2.0, 1.0, np.array([0, 1, 4, 9]))
    np.testing.assert_allclose(got, [0.0, 2.0, 8.0, 18.0])
    np.testing.assert_allclose(row_regularisation(2.0, 0.5, np.array([4, 9])), [4.0, 6.0])
    np.testing.assert_allclose(row_regularisation(2.0, 0.0, np.array([0, 3])), [0.0, 2.0])


@pytest.mark.parametrize("reg_exp", [0.5, 1.0])
def test_every_solver_solves_the_scaled_equations(problem, reg_exp, monkeypatch):
    import batch.solvers as solvers

    plays, Y = problem
    cm1 = confidence_matrix(plays, 2.0, "log")
    want = reference_half_step(cm1, Y, 0.05, reg_exp)
    unscaled = reference_half_step(cm1, Y, 0.05, 0.0)
    assert np.abs(want - unscaled).max() > 1e-2 * np.abs(want).max()  # the scaling matters here
    exact = half_step(cm1, Y, np.zeros((120, 8), np.float32), 0.05, solver="cholesky", reg_exp=reg_exp)
    np.testing.assert_allclose(exact, want, rtol=1e-4, atol=1e-6)
    assert not exact[5].any()
    x = np.zeros((120, 8), np.float32)
    for _ in range(8):  # CG (padded path) converges to the same solution
        x = half_step(cm1, Y, x, 0.05, solver="cg", cg_steps=3, reg_exp=reg_exp)
    assert np.abs(x - want).max() < 1e-3 * np.abs(want).max()
    start = np.full((120, 8), 0.01, np.float32)
    padded = half_step(cm1, Y, start, 0.05, n_threads=1, reg_exp=reg_exp)
    monkeypatch.setattr(solvers, "DENSE_MIN_DEGREE", 2)  # every row through the dense k x k path
    dense = half_step(cm1, Y, start, 0.05, n_threads=1, reg_exp=reg_exp)
    np.testing.assert_allclose(dense, padded, rtol=1e-4, atol=1e-6)


def test_hu_loss_weights_each_rows_norm_by_its_lambda():
    plays = random_plays(50, 40, 0.1, seed=2)
    params = AlsParams(factors=6, alpha=3.0, reg=0.7, reg_exp=1.0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6)).astype(np.float32)
    Y = rng.standard_normal((40, 6)).astype(np.float32)
    cm1 = confidence_matrix(plays, params.alpha, params.confidence, params.eps)
    dense = plays.toarray()
    c = 1.0 + confidence_minus_one(dense, params.alpha, params.confidence, params.eps).astype(np.float64)
    p = (dense > 0).astype(np.float64)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    n_u, n_i = p.sum(axis=1), p.sum(axis=0)
    want = (c * (p - X64 @ Y64.T) ** 2).sum()
    want += params.reg * ((n_u * (X64**2).sum(axis=1)).sum() + (n_i * (Y64**2).sum(axis=1)).sum())
    assert hu_loss(cm1, X, Y, params.reg, params.reg_exp) == pytest.approx(want, rel=1e-5)


def test_training_with_scaled_reg_descends_and_fold_in_stays_exact():
    plays = random_plays(150, 100, 0.06, seed=5)
    params = AlsParams(factors=10, iterations=5, alpha=2.0, reg=0.05, reg_exp=1.0, solver="cholesky")
    model = train_als(plays, params, show_progress=False)
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(model.losses, model.losses[1:]))
    rows = np.array([0, 7, 42, 149])
    cm1 = confidence_matrix(plays, params.alpha, params.confidence, params.eps)
    folded = fold_in_users(plays[rows], model.item_factors, params)
    want = reference_half_step(cm1[rows], model.item_factors, params.reg, params.reg_exp)
    np.testing.assert_allclose(folded, want, rtol=1e-4, atol=1e-6)
    # the last half-step was the items': their fold-in against the final users is the trained vectors
    items = fold_in_items(plays.T.tocsr(), model.user_factors, params)
    np.testing.assert_allclose(items, model.item_factors, rtol=1e-3, atol=1e-5)
    plain = train_als(plays, AlsParams(factors=10, iterations=5, alpha=2.0, reg=0.05, solver="cholesky"))
    assert not np.allclose(plain.user_factors, model.user_factors)


def test_reg_exp_out_of_range_is_explained():
    with pytest.raises(AlsParamsError, match="reg_exp"):
        AlsParams(reg_exp=-0.5)
    with pytest.raises(AlsParamsError, match="reg_exp"):
        AlsParams(reg_exp=float("nan"))


def test_the_stream_folds_in_users_and_tracks_exactly_under_scaled_reg(tmp_path):
    """LiveModel (the stream and the API): with reg_exp > 0 every user fold-in, cached stream path included,
    and every new-track solve is the scaled half-step, and an explanation still adds up to the score."""
    from batch.model_store import ModelStore
    from batch.training import train_and_publish
    from stream.live_model import LiveModel, UserChange
    from stream.track_state import TrackStats

    from .synthetic import synthetic_counts

    plays = random_plays(200, 120, 0.06, seed=8)
    params = AlsParams(factors=8, iterations=5, alpha=1.0, reg=0.02, reg_exp=1.0, seed=1)
    store = ModelStore(tmp_path / "store")
    train_and_publish(synthetic_counts(plays), store, params, holdout=0, show_progress=False)
    live = LiveModel(store.load(), use_index=False)
    assert live.params.reg_exp == 1.0
    Y = np.asarray(live.model.item_factors)
    counts = {"a": {"t1": 3.0, "t2": 1.0}, "b": {"t5": 2.0, "t7": 1.0, "t9": 6.0}}
    offsets = {"a": 0, "b": 0}
    live.fold_in_users(counts, {u: UserChange(-1, 0, {}) for u in counts})
    rng = np.random.default_rng(0)
    repeats = 0
    for step in range(12):  # new tracks change lambda_u (rebuilt), repeats do not (cached inverse updated)
        changes = {}
        for user, per_user in counts.items():
            track = f"t{int(rng.integers(0, 12))}" if step % 3 else f"t{20 + step}"
            repeats += track in per_user
            per_user[track] = per_user.get(track, 0.0) + 1
            changes[user] = UserChange(offsets[user], offsets[user] + 1, {track: (1, per_user[track])})
            offsets[user] += 1
        got = live.fold_in_users(counts, changes)
        for user, per_user in counts.items():
            cols = [int(t[1:]) for t in per_user]
            row = sp.csr_matrix((list(per_user.values()), ([0] * len(cols), cols)), shape=(1, 120), dtype=np.float32)
            cm1 = confidence_matrix(row, params.alpha, params.confidence, params.eps)
            want = reference_half_step(cm1, Y, params.reg, params.reg_exp)[0]
            np.testing.assert_allclose(got[user], want, rtol=1e-5, atol=1e-7, err_msg=f"step {step} {user}")
            assert live.cached_offset(user) == offsets[user]
    assert repeats >= 4  # both paths ran
    # a new track: batch fold-in and the stream's statistics agree on lambda = reg * listeners
    X = np.asarray(live.model.user_factors)
    listeners, streams = np.array([3, 9, 27, 81, 100]), np.array([5.0, 1.0, 2.0, 8.0, 3.0], np.float32)
    solved = live.fold_in_tracks({"fresh": (X[listeners], streams)})["fresh"]
    cm1 = sp.csr_matrix((np.log1p(streams), (np.zeros(5, int), listeners)), shape=(1, X.shape[0]), dtype=np.float32)
    np.testing.assert_allclose(solved, reference_half_step(cm1, X, params.reg, 1.0)[0], rtol=1e-4, atol=1e-6)
    stats = TrackStats("v", live.k)
    for i, n in zip(listeners, streams):
        stats.apply(X[i].astype("<f4").tobytes(), "v", float(np.log1p(n)), +1.0)
    assert live.track_regularisation(stats.listeners) == pytest.approx(params.reg * 5)
    np.testing.assert_allclose(stats.solve(live.user_gram, live.track_regularisation(5)), solved, rtol=1e-4)
    # the explanation solves the same scaled system: its contributions add up to the fold-in's score
    vector = live.fold_in_users({"b": counts["b"]})["b"]
    target = live.recommend_vector(vector, 1, exclude=counts["b"])[0]
    assert live.explain_counts(counts["b"], target.track)["score"] == pytest.approx(target.score, rel=1e-3)
