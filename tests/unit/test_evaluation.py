"""Holdout splits and ranking metrics on hand-checked examples."""

import numpy as np
import pytest
import scipy.sparse as sp

from batch.evaluation import EvaluationError, holdout_split, popularity_factors, ranking_metrics

from .synthetic import random_plays


def test_random_holdout_is_per_user_seeded_and_disjoint():
    plays = random_plays(200, 100, 0.1, seed=1)
    train, test = holdout_split(plays, 0.2, seed=4)
    again_train, again_test = holdout_split(plays, 0.2, seed=4)
    assert (train != again_train).nnz == 0 and (test != again_test).nnz == 0
    assert (train.multiply(test)).nnz == 0
    np.testing.assert_allclose((train + test).toarray(), plays.toarray())
    degrees = np.diff(plays.indptr)
    held = np.diff(test.indptr)
    assert (held[degrees < 5] == 0).all()
    big = degrees >= 5
    np.testing.assert_array_equal(held[big], np.maximum(1, np.round(0.2 * degrees[big])))


def test_time_based_holdout_takes_the_latest():
    plays = sp.csr_matrix(np.ones((1, 6), np.float32))
    stamps = sp.csr_matrix(np.array([[10, 60, 20, 50, 30, 40]], dtype=np.float64))
    train, test = holdout_split(plays, 0.34, timestamps=stamps)
    assert sorted(test.indices.tolist()) == [1, 3]
    assert sorted(train.indices.tolist()) == [0, 2, 4, 5]


def test_metrics_by_hand():
    # 1 user, 5 items; scores rank items 4 > 3 > 2 > 1 > 0; item 4 is a training item (excluded).
    X = np.ones((1, 1), np.float32)
    Y = np.arange(5, dtype=np.float32)[:, None]
    train = sp.csr_matrix(np.array([[0, 0, 0, 0, 1]], np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 3, 1, 0]], np.float32))  # held out: items 2 (rank 2), 3 (rank 1)
    m = ranking_metrics(X, Y, train, test, k=2)
    assert m.precision == pytest.approx(1.0)
    assert m.recall == pytest.approx(1.0)
    assert m.ndcg == pytest.approx(1.0)
    # candidates 0..3; item 3 is top (0 better -> 0/3), item 2 second (1 better -> 1/3)
    assert m.mpr_unweighted == pytest.approx((0 + 1 / 3) / 2)
    assert m.mpr == pytest.approx((1 * 0 + 3 * (1 / 3)) / 4)
    m1 = ranking_metrics(X, Y, train, test, k=1)
    assert m1.precision == pytest.approx(1.0) and m1.recall == pytest.approx(0.5)
    miss = ranking_metrics(X, -Y, train, test, k=2)  # reversed scores: items 0, 1 on top
    assert miss.precision == 0 and miss.ndcg == 0
    assert miss.mpr_unweighted == pytest.approx((1.0 + 2 / 3) / 2)


def test_popularity_baseline_and_a_learnt_model_beat_random():
    plays = random_plays(400, 150, 0.06, seed=9)
    train, test = holdout_split(plays, 0.2, seed=0)
    pop = ranking_metrics(*popularity_factors(train), train, test, k=10)
    rng = np.random.default_rng(0)
    rand = ranking_metrics(rng.random((400, 4), dtype=np.float32), rng.random((150, 4), dtype=np.float32), train, test)
    assert pop.precision > rand.precision
    assert pop.mpr < 0.5 and 0.3 < rand.mpr_unweighted < 0.7


def test_errors():
    plays = random_plays(10, 10, 0.2)
    with pytest.raises(EvaluationError, match="between 0 and 1"):
        holdout_split(plays, 1.5)
    train, test = holdout_split(plays, 0.2, min_items=1000)
    with pytest.raises(EvaluationError, match="no held-out items"):
        ranking_metrics(np.ones((10, 2), np.float32), np.ones((10, 2), np.float32), train, test)
    with pytest.raises(EvaluationError, match="do not match"):
        ranking_metrics(np.ones((3, 2), np.float32), np.ones((10, 2), np.float32), train, test)


@pytest.mark.parametrize("n_items", [7, 300, 640, 701, 5000])
def test_top_k_rows_equals_a_full_sort(n_items):
    """The chunk-bound top-k: the same items in the same order as sorting every score (ties by index)."""
    from batch.evaluation import top_k_rows

    rng = np.random.default_rng(n_items)
    scores = rng.standard_normal((41, n_items)).astype(np.float32)
    scores[:, rng.integers(0, n_items, n_items // 3)] = -np.inf  # training items
    scores[3] = np.round(scores[3])  # many ties
    scores[5, : n_items - 2] = -np.inf  # a user who streamed nearly everything
    scores[7, 0] = np.nan
    k = min(10, n_items)
    keyed = np.where(np.isnan(scores), -np.inf, scores)
    want = np.lexsort((np.broadcast_to(np.arange(n_items), scores.shape), -keyed), axis=1)[:, :k]
    got = top_k_rows(scores, k)
    finite = [r for r in range(41) if r != 7]
    np.testing.assert_array_equal(got[finite], want[finite])
    assert got.shape == (41, k) and len(set(got[7].tolist())) == k


def test_metrics_match_a_dense_reference_on_random_models():
    plays = random_plays(300, 2000, 0.01, seed=9)
    train, test = holdout_split(plays, 0.2, seed=2)
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((300, 6)).astype(np.float32), rng.standard_normal((2000, 6)).astype(np.float32)
    m = ranking_metrics(X, Y, train, test, 10)
    scores = X @ Y.T
    scores[train.toarray() > 0] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    relevant = test.toarray() > 0
    hits = np.take_along_axis(relevant, top, axis=1)[users]
    n_rel = relevant[users].sum(axis=1)
    discounts = 1.0 / np.log2(np.arange(2, 12))
    ndcg = (hits @ discounts) / np.cumsum(discounts)[np.minimum(n_rel, 10) - 1]
    assert m.precision == pytest.approx(hits.sum(axis=1).mean() / 10, rel=1e-9)
    assert m.ndcg == pytest.approx(ndcg.mean(), rel=1e-9)
