"""The ALS half-steps, the trainer and fold-in against a dense float64 reference."""

import numpy as np
import pytest
import scipy.sparse as sp

from batch.als import AlsParams, AlsParamsError, hu_loss, train_als
from batch.confidence import ConfidenceError, confidence_matrix, confidence_minus_one
from batch.foldin import FoldInError, fold_in_items, fold_in_users
from batch.solvers import SolverError, half_step

from .synthetic import random_plays


def reference_half_step(cm1: sp.csr_matrix, other: np.ndarray, reg: float, reg_exp: float = 0.0) -> np.ndarray:
    """x_u = (Y^T C_u Y + reg n_u^reg_exp I)^-1 Y^T C_u p_u, one dense float64 solve per row."""
    Y = other.astype(np.float64)
    k = Y.shape[1]
    dense = cm1.toarray().astype(np.float64)
    pattern = (cm1 != 0).toarray() | (dense > 0)
    out = np.zeros((cm1.shape[0], k))
    for u in range(cm1.shape[0]):
        n_u = int(pattern[u].sum())
        if not n_u:
            continue
        c = 1.0 + dense[u]
        A = Y.T @ (Y * c[:, None]) + reg * n_u**reg_exp * np.eye(k)
        out[u] = np.linalg.solve(A, Y.T @ (c * pattern[u]))
    return out


def dense_loss(plays, X, Y, params):
    c = 1.0 + confidence_minus_one(plays.toarray(), params.alpha, params.confidence, params.eps).astype(np.float64)
    p = (plays.toarray() > 0).astype(np.float64)
    pred = X.astype(np.float64) @ Y.astype(np.float64).T
    return float((c * (p - pred) ** 2).sum() + params.reg * ((X.astype(np.float64) ** 2).sum() + (Y**2).sum()))


def small_problem():
    """120 x 80 heavy-tailed plays (user 5 has none) and fixed 80 x 8 factors."""
    plays = random_plays(120, 80, 0.08, seed=3)
    keep = np.ones(plays.shape[0], np.float32)
    keep[5] = 0.0  # a user without streams
    plays = sp.csr_matrix(sp.diags(keep) @ plays)
    plays.eliminate_zeros()
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((80, 8)).astype(np.float32) * 0.3
    return plays, Y


@pytest.fixture
def problem():
    return small_problem()


def test_exact_half_step_matches_dense_reference(problem):
    plays, Y = problem
    cm1 = confidence_matrix(plays, 2.0, "log")
    X0 = np.zeros((plays.shape[0], 8), np.float32)
    got = half_step(cm1, Y, X0, reg=0.5, solver="cholesky")
    want = reference_half_step(cm1, Y, 0.5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not got[5].any()


def test_cg_converges_to_the_exact_solution(problem):
    plays, Y = problem
    cm1 = confidence_matrix(plays, 1.0, "linear")
    want = reference_half_step(cm1, Y, 0.1)
    x = np.zeros((plays.shape[0], 8), np.float32)
    errors = []
    for _ in range(6):
        x = half_step(cm1, Y, x, reg=0.1, solver="cg", cg_steps=3)
        errors.append(np.abs(x - want).max() / np.abs(want).max())
    assert errors[-1] < 1e-3
    assert errors[-1] < errors[0]


def test_single_thread_and_threaded_cg_agree(problem):
    plays, Y = problem
    cm1 = confidence_matrix(plays, 1.0, "log")
    x = np.full((plays.shape[0], 8), 0.01, np.float32)
    a = half_step(cm1, Y, x, 0.1, n_threads=1)
    b = half_step(cm1, Y, x, 0.1, n_threads=4)
    np.testing.assert_array_equal(a, b)


def test_half_step_rejects_mismatched_shapes(problem):
    plays, Y = problem
    cm1 = confidence_matrix(plays, 1.0)
    with pytest.raises(SolverError, match="columns"):
        half_step(cm1, Y[:10], np.zeros((120, 8), np.float32), 0.1)
    with pytest.raises(SolverError, match="x must be shaped"):
        half_step(cm1, Y, np.zeros((3, 8), np.float32), 0.1)
    with pytest.raises(SolverError, match="unknown solver"):
        half_step(cm1, Y, np.zeros((120, 8), np.float32), 0.1, solver="qr")


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_training_reduces_the_hu_loss_and_is_seeded(solver):
    plays = random_plays(200, 150, 0.05, seed=7)
    params = AlsParams(factors=12, iterations=6, alpha=2.0, reg=0.5, solver=solver, seed=11)
    a = train_als(plays, params, show_progress=False)
    b = train_als(plays, params, show_progress=False)
    assert a.user_factors.dtype == np.float32 and a.item_factors.dtype == np.float32
    np.testing.assert_array_equal(a.user_factors, b.user_factors)
    assert a.losses[-1] < a.losses[0]
    if solver == "cholesky":  # exact alternating minimisation never increases the loss
        assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(a.losses, a.losses[1:]))
    other = train_als(
        plays, AlsParams(factors=12, iterations=6, alpha=2.0, reg=0.5, solver=solver, seed=12), show_progress=False
    )
    assert not np.array_equal(a.user_factors, other.user_factors)


def test_hu_loss_matches_dense_definition():
    plays = random_plays(50, 40, 0.1, seed=2)
    params = AlsParams(factors=6, alpha=3.0, reg=0.7, confidence="log")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6)).astype(np.float32)
    Y = rng.standard_normal((40, 6)).astype(np.float32)
    cm1 = confidence_matrix(plays, params.alpha, params.confidence, params.eps)
    assert hu_loss(cm1, X, Y, params.reg) == pytest.approx(dense_loss(plays, X, Y, params), rel=1e-5)


def test_fold_in_users_equals_the_half_step_solution():
    plays = random_plays(150, 100, 0.06, seed=5)
    params = AlsParams(factors=10, iterations=4, alpha=1.0, reg=0.1)
    model = train_als(plays, params, show_progress=False)
    rows = np.array([0, 7, 42, 149])
    folded = fold_in_users(plays[rows], model.item_factors, params)
    cm1 = confidence_matrix(plays, params.alpha, params.confidence, params.eps)
    want = reference_half_step(cm1[rows], model.item_factors, params.reg)
    rel = np.linalg.norm(folded - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 1e-4


def test_fold_in_items_equals_the_half_step_solution():
    plays = random_plays(150, 100, 0.06, seed=6)
    params = AlsParams(factors=10, iterations=4, alpha=2.0, reg=1.0, confidence="linear")
    model = train_als(plays, params, show_progress=False)
    item_plays = plays.T.tocsr()[[1, 50, 99]]
    folded = fold_in_items(item_plays, model.user_factors, params)
    cm1 = confidence_matrix(item_plays, params.alpha, params.confidence, params.eps)
    want = reference_half_step(cm1, model.user_factors, params.reg)
    np.testing.assert_allclose(folded, want, rtol=1e-4, atol=1e-6)


def test_fold_in_checks_the_width_and_sign():
    params = AlsParams(factors=4)
    Y = np.ones((5, 4), np.float32)
    with pytest.raises(FoldInError, match="columns"):
        fold_in_users(sp.csr_matrix(np.ones((2, 3), np.float32)), Y, params)
    with pytest.raises(FoldInError, match=">= 0"):
        fold_in_users(sp.csr_matrix(-np.ones((1, 5), np.float32)), Y, params)


def test_invalid_parameters_are_explained():
    with pytest.raises(AlsParamsError, match="alpha"):
        AlsParams(alpha=0)
    with pytest.raises(AlsParamsError, match="confidence"):
        AlsParams(confidence="square")
    with pytest.raises(AlsParamsError, match="solver"):
        AlsParams(solver="sgd")
    with pytest.raises(ConfidenceError, match="unknown confidence"):
        confidence_minus_one(np.ones(2), 1.0, "square")


def test_heavy_rows_take_the_dense_path_and_agree(problem, monkeypatch):
    """Rows past DENSE_MIN_DEGREE build their k x k system in pieces: same CG result as the padded path."""
    import batch.solvers as solvers

    plays, Y = problem
    cm1 = confidence_matrix(plays, 1.0, "log")
    x = np.full((plays.shape[0], 8), 0.01, np.float32)
    padded = half_step(cm1, Y, x, 0.1, n_threads=1)
    monkeypatch.setattr(solvers, "DENSE_MIN_DEGREE", 2)
    monkeypatch.setattr(solvers, "DENSE_PIECE_NNZ", 3)
    calls = []
    real = solvers._cg_dense
    monkeypatch.setattr(solvers, "_cg_dense", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dense = half_step(cm1, Y, x, 0.1, n_threads=1)
    assert calls, "the dense path was not taken"
    np.testing.assert_allclose(dense, padded, rtol=1e-4, atol=1e-6)
    want = reference_half_step(cm1, Y, 0.1)
    exact = half_step(cm1, Y, x, 0.1, solver="cholesky")
    np.testing.assert_allclose(exact, want, rtol=1e-4, atol=1e-6)
