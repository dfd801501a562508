"""Metric reductions: map items and queries into the *routing space* the trees split.

Every metric is reduced to nearest-neighbour search under euclidean distance in routing space:

* ``euclidean``: items and queries are used as they are (``dim`` columns).
* ``cosine``: items and queries are scaled to unit length (zero vectors stay zero).
* ``dot`` (maximum inner product): item ``y`` becomes ``[y, sqrt(M^2 - |y|^2)] / M`` (on the unit
  sphere, ``dim + 1`` columns) and query ``x`` becomes ``[x, 0] / |x|``; then
  ``|q - z|^2 = 2 - 2 x.y / (M |x|)``, so the nearest items in routing space are the largest inner
  products. ``M`` is the reference norm fixed at build time. An item added later with ``|y| > M``
  gets extra coordinate 0 and is scaled onto the sphere (``[y / |y|, 0]``): it is routed by its
  direction only. Its scores stay exact (re-ranking uses the raw vectors); only the routing of such
  items is approximate, see ``docs/FOREST.md``.

Routing vectors are only used to descend the trees; exact scores always come from raw vectors.
"""

from __future__ import annotations

import numpy as np

from .errors import UnknownMetricError

METRICS = ("dot", "cosine", "euclidean")


def check_metric(metric: str) -> str:
    """Return ``metric`` or raise :class:`UnknownMetricError` naming the valid choices."""
    if metric not in METRICS:
        raise UnknownMetricError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def routing_dim(metric: str, dim: int) -> int:
    """Number of routing-space columns for ``dim``-dimensional vectors."""
    return dim + 1 if metric == "dot" else dim


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def items_to_routing(vectors: np.ndarray, metric: str, ref_norm: float) -> np.ndarray:
    """Map raw item vectors ``(n, dim)`` to routing space ``(n, routing_dim)`` float32.

    ``ref_norm`` is ``M`` for ``dot`` (ignored otherwise); items with norm above it are projected
    onto the sphere with a zero extra coordinate (see module docstring).
    """
    x = np.asarray(vectors, dtype=np.float32)
    if metric == "euclidean":
        return np.ascontiguousarray(x)
    if metric == "cosine":
        return _unit_rows(x)
    n, dim = x.shape
    out = np.empty((n, dim + 1), dtype=np.float32)
    if ref_norm <= 0:  # every item is the zero vector
        out.fill(0.0)
        return out
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    m2 = float(ref_norm) ** 2
    over = sq > m2
    out[:, :dim] = x / np.float32(ref_norm)
    out[:, dim] = np.sqrt(np.maximum(m2 - sq, 0.0) / m2)
    if over.any():
        out[over, :dim] = _unit_rows(x[over])
        out[over, dim] = 0.0
    return out


def queries_to_routing(queries: np.ndarray, metric: str) -> np.ndarray:
    """Map raw queries ``(q, dim)`` to routing space ``(q, routing_dim)`` float32."""
    x = np.asarray(queries, dtype=np.float32)
    if metric == "euclidean":
        return np.ascontiguousarray(x)
    unit = _unit_rows(x)
    if metric == "cosine":
        return unit
    return np.concatenate([unit, np.zeros((x.shape[0], 1), dtype=np.float32)], axis=1)
