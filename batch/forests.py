"""The model version's search indexes: a hyperplane forest for user -> track (inner product) and one
for track -> similar tracks (cosine), saved as `.npy` arrays inside the version directory."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index import HyperplaneForest

log = logging.getLogger(__name__)

DOT_PREFIX = "forest-dot"
COSINE_PREFIX = "forest-cosine"


@dataclass(frozen=True)
class ForestParams:
    """Forest shape. One tree with 64-item leaves uses the leaf-scan search, the fastest measured
    (docs/BENCHMARKS-forest.md); more trees switch to the tree walk. leaf_size bounds items per leaf."""

    n_trees: int = 1
    leaf_size: int = 64
    seed: int = 0


def make_forests(
    item_ids: np.ndarray, item_factors: np.ndarray, params: ForestParams
) -> tuple[HyperplaneForest, HyperplaneForest]:
    """(inner-product forest, cosine forest) over the tracks, in memory."""
    ids = np.asarray(item_ids).astype(str)
    vectors = np.ascontiguousarray(item_factors, dtype=np.float32)
    built = []
    for metric in ("dot", "cosine"):
        forest = HyperplaneForest(
            vectors.shape[1], metric=metric, n_trees=params.n_trees, leaf_size=params.leaf_size, seed=params.seed
        )
        built.append(forest.build(vectors, ids))
        log.info("built %s forest: %d items, %d trees", metric, len(ids), params.n_trees)
    return built[0], built[1]


def build_forests(
    directory: Path, item_ids: np.ndarray, item_factors: np.ndarray, params: ForestParams
) -> dict[str, Any]:
    """Build and save both forests into `directory`; returns manifest fields describing them."""
    out: dict[str, Any] = {"forest": {**asdict(params), "files": {}}}
    forests = make_forests(item_ids, item_factors, params)
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
