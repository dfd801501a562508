"""The forest's calibrated default `search_k` (index/calibrate.py) and its exact reference search."""

from __future__ import annotations

import numpy as np
import pytest

from batch.forests import ForestParams, build_forests, load_forests
from index import HyperplaneForest
from index.calibrate import calibrate, recall_at_k

from .test_forest import DIM, _clustered, _exact


@pytest.mark.parametrize("metric", ["dot", "cosine", "euclidean"])
def test_exact_search_is_brute_force_with_exclusions(metric: str) -> None:
    x = _clustered(3000, seed=1)
    q = _clustered(20, seed=2)
    f = HyperplaneForest(DIM, metric, n_trees=1, leaf_size=32, seed=0).build(x, np.arange(3000))
    truth = _exact(x, q, metric, 30)
    excl = [row[:5].tolist() for row in truth]
    f.remove([int(truth[0, 6])])
    ids, _ = f.query_batch(q, k=10, exact=True, exclude=excl)
    for i, row in enumerate(truth):
        want = [t for t in row.tolist() if t not in excl[i] and t != truth[0, 6]][:10]
        assert ids[i].tolist() == want


def test_calibrate_picks_the_smallest_ladder_value_reaching_the_target() -> None:
    x = _clustered(8000, seed=3, skew=0.3)
    q = _clustered(200, seed=4)
    f = HyperplaneForest(DIM, "dot", n_trees=1, leaf_size=32, seed=0).build(x, np.arange(8000))
    ladder = (20, 40, 80, 160, 320, 640, 1280, 2560)
    cal = calibrate(f, q, target=0.95, ladder=ladder)
    sks = [s for s, _ in cal.points]
    assert sks == list(ladder[: len(sks)]) and cal.reached and cal.search_k == sks[-1] == f.default_search_k
    assert cal.points[-1][1] >= 0.95 and all(r < 0.95 for _, r in cal.points[:-1])
    assert len(sks) >= 2  # the first ladder value is too few candidates on this data
    truth = _exact(x, q, "dot", 10)
    found, _ = f.query_batch(q, k=10)  # no search_k: the calibrated default
    assert recall_at_k(found, truth, -1) == pytest.approx(cal.points[-1][1])
    cal99 = calibrate(f, q, target=0.99, ladder=ladder)
    assert cal99.search_k > cal.search_k  # a higher target needs more candidates


def test_unreachable_target_and_bad_target() -> None:
    x = _clustered(2000, seed=5)
    f = HyperplaneForest(DIM, "cosine", n_trees=1, leaf_size=32, seed=0).build(x, np.arange(2000))
    cal = calibrate(f, _clustered(50, seed=6), target=1.0, ladder=(5, 10))
    assert not cal.reached and cal.search_k == 10 == f.default_search_k
    with pytest.raises(ValueError, match="target recall"):
        calibrate(f, x[:5], target=0.0)


def test_calibrated_forests_are_saved_loaded_and_recorded(tmp_path) -> None:
    items = _clustered(6000, seed=7, skew=0.3)
    users = _clustered(400, seed=8)
    ids = np.array([f"t{i}" for i in range(len(items))])
    fields = build_forests(tmp_path, ids, items, ForestParams(leaf_size=32, calibration_queries=300), users)
    cal = fields["forest"]["calibration"]
    assert set(cal) == {"dot", "cosine"} and all(cal[m]["queries"] == 300 for m in cal)
    assert all(cal[m]["points"][-1][1] >= 0.95 and cal[m]["reached"] for m in cal)
    dot, cosine = load_forests(tmp_path)
    assert dot.default_search_k == cal["dot"]["search_k"] and cosine.default_search_k == cal["cosine"]["search_k"]
    off = build_forests(tmp_path / "off", ids, items, ForestParams(leaf_size=32, calibration_queries=0), users)
    assert off["forest"]["calibration"] == {} and load_forests(tmp_path / "off")[0].default_search_k is None
