"""Approximate nearest-neighbour index: the hyperplane forest (numpy only).

>>> from index import HyperplaneForest
>>> f = HyperplaneForest(dim=40, metric="dot", n_trees=50, seed=0).build(vectors, ids)
>>> ids, scores = f.query_batch(queries, k=10)
"""

from .errors import (
    DimensionError,
    DuplicateIdError,
    ForestError,
    IdTypeError,
    NotBuiltError,
    StorageError,
    UnknownIdError,
    UnknownMetricError,
)
from .forest import HyperplaneForest
from .transforms import METRICS

__all__ = [
    "METRICS",
    "DimensionError",
    "DuplicateIdError",
    "ForestError",
    "HyperplaneForest",
    "IdTypeError",
    "NotBuiltError",
    "StorageError",
    "UnknownIdError",
    "UnknownMetricError",
]
