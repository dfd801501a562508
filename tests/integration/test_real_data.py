"""Training on the real data sets in ../shared/data (never copied into the repository)."""

import os
from pathlib import Path

import pytest

from batch.als import AlsParams, train_als
from batch.evaluation import holdout_split, ranking_metrics
from batch.foldin import fold_in_users
from batch.plays import read_play_counts
from batch.training import evaluate_params

DATA = Path(os.environ.get("PLAYREC_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
LASTFM = DATA / "lastfm-2k" / "user_artists.dat"
MOVIELENS = DATA / "ml-100k" / "u.data"


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: set PLAYREC_DATA to the folder holding lastfm-2k/ and ml-100k/")
    return path


def test_lastfm_default_parameters_rank_well():
    counts = read_play_counts(require(LASTFM))
    assert counts.shape == (1892, 17632) and counts.nnz == 92834
    metrics, popularity, _ = evaluate_params(counts, AlsParams(iterations=15), 0.2, show_progress=False)
    # DESIGN.md anchors: implicit (log confidence) P@10 0.195, NDCG@10 0.234; popularity P@10 0.069.
    assert metrics.precision >= 0.18 and metrics.ndcg >= 0.22
    assert metrics.precision > 2 * popularity.precision
    assert metrics.mpr < popularity.mpr


def test_movielens_time_split_beats_popularity():
    counts = read_play_counts(require(MOVIELENS), binarize=True)
    assert counts.nnz == 100_000 and counts.last_played is not None
    metrics, popularity, _ = evaluate_params(counts, AlsParams(iterations=15), 0.2, show_progress=False)
    assert metrics.precision > popularity.precision
    assert metrics.mpr < popularity.mpr


def test_lastfm_users_folded_in_rank_like_batch_trained_ones():
    """Fold every user in from their training plays against the batch item factors: P@10 within 2%."""
    counts = read_play_counts(require(LASTFM))
    params = AlsParams(iterations=15)
    train, test = holdout_split(counts.matrix, 0.2, seed=0)
    model = train_als(train, params, show_progress=False)
    batch = ranking_metrics(model.user_factors, model.item_factors, train, test)
    folded = fold_in_users(train, model.item_factors, params)
    again = ranking_metrics(folded, model.item_factors, train, test)
    assert abs(again.precision - batch.precision) <= 0.02 * batch.precision
