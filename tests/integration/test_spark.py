"""`--engine spark`: Spark MLlib ALS on local[2] against playrec's own trainer (docs/SPARK.md).

Needs pyspark, pandas and pyarrow (`pip install 'playrec[spark]'`) and Java 17; the Last.fm 2K file is read
from ../shared/data or $PLAYREC_DATA (never copied into the repository).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from batch.als import AlsParams, AlsParamsError, train_als
from batch.evaluation import holdout_split, ranking_metrics
from batch.plays import read_play_counts
from batch.spark_engine import SparkEngineError, spark_ratings, spark_reg_param, train_spark

DATA = Path(os.environ.get("PLAYREC_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
LASTFM = DATA / "lastfm-2k" / "user_artists.dat"
MASTER = "local[2]"
CONF = {"spark.driver.memory": "1g"}


def require_spark() -> None:
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
        import pyspark  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the Spark engine's tests need {exc.name}: pip install -e '.[test,spark]'", pytrace=False)


def synthetic_plays() -> sp.csr_matrix:
    """40 users x 25 tracks of stream counts; users 3 and 39 and tracks 7 and 24 have no streams."""
    rng = np.random.default_rng(5)
    dense = rng.integers(1, 50, size=(40, 25)).astype(np.float32) * (rng.random((40, 25)) < 0.3)
    dense[[3, 39], :] = 0
    dense[:, [7, 24]] = 0
    coo = sp.coo_matrix(dense)
    # plus an explicitly stored zero (user 10, track 7): no stream, so no preference and no factor
    return sp.csr_matrix((np.append(coo.data, 0.0), (np.append(coo.row, 10), np.append(coo.col, 7))), shape=dense.shape)


# --- parameter mapping: no Spark needed -------------------------------------------------------------


def test_ratings_give_spark_playrec_confidence():
    plays = sp.csr_matrix(np.array([[0, 1, 9], [3, 0, 0]], dtype=np.float32))
    log_form = spark_ratings(plays, AlsParams(confidence="log", eps=2.0))
    np.testing.assert_allclose(log_form, np.log1p(np.array([1, 9, 3]) / 2.0), rtol=1e-6)
    assert log_form.dtype == np.float32
    np.testing.assert_array_equal(spark_ratings(plays, AlsParams(confidence="linear")), [1, 9, 3])


def test_reg_param_gives_the_average_user_playrec_lambda():
    # users with 2, 1 and 0 tracks (the last one has no streams and does not count)
    plays = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32))
    reg_param = spark_reg_param(plays, 0.3)
    # Spark's lambda_u = regParam * n_u; averaged over the users with streams it is playrec's reg
    assert np.mean(reg_param * np.array([2, 1])) == pytest.approx(0.3)
    assert spark_reg_param(sp.csr_matrix((2, 2), dtype=np.float32), 0.1) == 0.1
    # playrec's frequency-scaled reg with exponent 1 is Spark's own scaling: regParam = reg exactly
    assert spark_reg_param(plays, 0.3, reg_exp=1.0) == 0.3
    with pytest.raises(AlsParamsError, match=r"reg_exp=0\.5 has no Spark equivalent"):
        spark_reg_param(plays, 0.3, reg_exp=0.5)


def test_missing_pyspark_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark -> ImportError
    with pytest.raises(SparkEngineError, match=r"pip install 'playrec\[spark\]'"):
        train_spark(synthetic_plays(), AlsParams(factors=2, iterations=1), show_progress=False)


def test_missing_java_names_the_extra(monkeypatch, tmp_path):
    require_spark()
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java"))
    with pytest.raises(SparkEngineError, match=r"Java.*pip install 'playrec\[spark\]'"):
        train_spark(synthetic_plays(), AlsParams(factors=2, iterations=1), show_progress=False)


def test_negative_plays_are_refused():
    with pytest.raises(AlsParamsError):
        train_spark(sp.csr_matrix(np.array([[1.0, -1.0]], dtype=np.float32)), show_progress=False)


# --- Spark on local[2] ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_spark_factors_are_aligned_with_the_matrix():
    require_spark()
    plays = synthetic_plays()
    params = AlsParams(factors=6, iterations=3, seed=4)
    result = train_spark(plays, params, master=MASTER, spark_conf=CONF, show_progress=False)
    assert result.user_factors.shape == (40, 6) and result.item_factors.shape == (25, 6)
    assert result.user_factors.dtype == np.float32 and result.item_factors.dtype == np.float32
    assert result.user_factors.flags.c_contiguous and result.item_factors.flags.c_contiguous
    # users and tracks without streams get rows of zeros; everyone else a trained, finite vector
    assert not result.user_factors[[3, 39]].any() and not result.item_factors[[7, 24]].any()
    streamed = plays.toarray() > 0
    active_users, active_items = np.flatnonzero(streamed.any(axis=1)), np.flatnonzero(streamed.any(axis=0))
    assert 7 not in active_items and plays[10, 7] == 0 and plays.nnz == streamed.sum() + 1  # input untouched
    assert np.isfinite(result.user_factors).all() and np.isfinite(result.item_factors).all()
    assert (np.abs(result.user_factors[active_users]).sum(axis=1) > 0).all()
    assert (np.abs(result.item_factors[active_items]).sum(axis=1) > 0).all()
    assert result.losses == [] and len(result.seconds) == 3
    # rows really are aligned: a user's streamed tracks outscore, on average, the ones they did not stream
    scores = result.user_factors @ result.item_factors.T
    assert scores[streamed].mean() > scores[~streamed].mean() + 0.1


@pytest.mark.integration
def test_lastfm_spark_ranks_like_numpy(request):
    """Last.fm 2K, 20% per-user holdout (seed 0), 40 factors, 15 iterations: Spark ranks as well as numpy."""
    require_spark()
    if not LASTFM.is_file():
        pytest.fail(f"{LASTFM} is missing: set PLAYREC_DATA to the folder holding lastfm-2k/", pytrace=False)
    counts = read_play_counts(LASTFM)
    train, test = holdout_split(counts.matrix, 0.2, seed=0)
    params = AlsParams(factors=40, iterations=15)

    start = time.perf_counter()
    reference = train_als(train, params, show_progress=False, compute_loss=False)
    numpy_s = time.perf_counter() - start
    start = time.perf_counter()
    spark = train_spark(train, params, master=MASTER, spark_conf=CONF, show_progress=False)
    spark_s = time.perf_counter() - start

    want = ranking_metrics(reference.user_factors, reference.item_factors, train, test)
    got = ranking_metrics(spark.user_factors, spark.item_factors, train, test)
    for name, value in (
        ("numpy_wall_s", numpy_s),
        ("spark_wall_s", spark_s),
        ("spark_s_per_iteration", spark.seconds[0]),
        ("numpy_p_at_10", want.precision),
        ("spark_p_at_10", got.precision),
        ("numpy_ndcg_at_10", want.ndcg),
        ("spark_ndcg_at_10", got.ndcg),
    ):
        request.node.user_properties.append((name, round(value, 4)))  # in --junitxml reports (xunit1)
    print(f"\nnumpy {numpy_s:.1f} s: {want.describe()}\nspark {spark_s:.1f} s ({MASTER}): {got.describe()}")
    # no more than 5% worse than numpy (and not wildly better: the parameter mapping must stay equivalent)
    assert 0.95 * want.precision <= got.precision <= 1.10 * want.precision
    assert got.ndcg >= 0.95 * want.ndcg
    assert got.mpr < 0.09  # popularity's MPR is 9.2% (DESIGN.md)
