"""The model version's search indexes: a hyperplane forest for user -> track (inner product) and one
for track -> similar tracks (cosine), saved as `.npy` arrays inside the version directory.

After the build each forest's default `search_k` is calibrated on the model's own vectors
(`index.calibrate`): the smallest candidate count whose recall@10 against exact search reaches
`ForestParams.target_recall` on a seeded sample of queries (user vectors for the inner-product
forest, track vectors for the cosine one). The choice is saved with the forest and recorded in the
manifest (`forest.calibration`), and every query that gives no `search_k` uses it."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index import HyperplaneForest
from index.calibrate import calibrate

log = logging.getLogger(__name__)

DOT_PREFIX = "forest-dot"
COSINE_PREFIX = "forest-cosine"


@dataclass(frozen=True)
class ForestParams:
    """Forest shape and calibration. One tree uses the leaf-scan search over Lloyd-refined leaves, the
    fastest measured (docs/BENCHMARKS-forest.md); more trees switch to the tree walk. leaf_size bounds
    items per leaf. target_recall: recall@10 the calibrated default `search_k` must reach on
    calibration_queries sampled queries (0 queries: no calibration, the forest's formula)."""

    n_trees: int = 1
    leaf_size: int = 64
    seed: int = 0
    target_recall: float = 0.95
    calibration_queries: int = 500


def _sample(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).choice(len(vectors), min(n, len(vectors)), replace=False)
    return np.ascontiguousarray(vectors[np.sort(rows)], dtype=np.float32)


def make_forests(
    item_ids: np.ndarray,
    item_factors: np.ndarray,
    params: ForestParams,
    user_factors: np.ndarray | None = None,
    calibration: dict[str, Any] | None = None,
) -> tuple[HyperplaneForest, HyperplaneForest]:
    """(inner-product forest, cosine forest) over the tracks, in memory, each with its calibrated
    default `search_k` (inner product on a sample of `user_factors (n_users, k)`, or of the tracks when
    none are given; cosine on a sample of the tracks). `calibration`, when given, receives what was
    measured per metric (`Calibration.to_dict()`)."""
    ids = np.asarray(item_ids).astype(str)
    vectors = np.ascontiguousarray(item_factors, dtype=np.float32)
    users = vectors if user_factors is None or not len(user_factors) else np.asarray(user_factors)
    built = []
    for metric, queries in (("dot", users), ("cosine", vectors)):
        forest = HyperplaneForest(
            vectors.shape[1], metric=metric, n_trees=params.n_trees, leaf_size=params.leaf_size, seed=params.seed
        )
        built.append(forest.build(vectors, ids))
        how = "formula"
        if params.calibration_queries > 0 and len(ids):
            cal = calibrate(forest, _sample(queries, params.calibration_queries, params.seed), params.target_recall)
            how = f"recall@10 {cal.points[-1][1]:.3f} at search_k {cal.search_k} on {cal.queries} queries"
            if not cal.reached:
                how += f" (target {cal.target} not reached)"
            if calibration is not None:
                calibration[metric] = cal.to_dict()
        log.info("built %s forest: %d items, %d trees; default search_k: %s", metric, len(ids), params.n_trees, how)
    return built[0], built[1]


def build_forests(
    directory: Path,
    item_ids: np.ndarray,
    item_factors: np.ndarray,
    params: ForestParams,
    user_factors: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build, calibrate and save both forests into `directory`; returns manifest fields describing them
    (`forest.calibration`: per metric the chosen `search_k` and the recall measured at each value tried)."""
    calibration: dict[str, Any] = {}
    out: dict[str, Any] = {"forest": {**asdict(params), "files": {}, "calibration": calibration}}
    forests = make_forests(item_ids, item_factors, params, user_factors, calibration)
    for metric, prefix, forest in (("dot", DOT_PREFIX, forests[0]), ("cosine", COSINE_PREFIX, forests[1])):
        forest.save(directory, prefix=prefix)
        out["forest"]["files"][metric] = prefix
    return out


def load_forests(directory: Path) -> tuple[HyperplaneForest | None, HyperplaneForest | None]:
    """(dot forest, cosine forest) of a version directory, memory-mapped; None where absent."""
    found = []
    for prefix in (DOT_PREFIX, COSINE_PREFIX):
        if any(Path(directory).glob(f"{prefix}.*")):
            found.append(HyperplaneForest.load(directory, prefix=prefix, mmap=True))
        else:
            found.append(None)
    return found[0], found[1]
