"""A forest's default ``search_k`` measured on its own data: the smallest candidate count of a ladder
whose recall@k against exact search reaches a target on a sample of queries.

The candidates a forest needs for a given recall depend on the data (on the 1M-item synthetic set,
MIPS user queries reach 0.95 with ~800 candidates while cosine track queries need several times
more; docs/BENCHMARKS-forest.md), so a constant default is too slow on one data set and too
inaccurate on another. ``calibrate`` measures it once after the build (a few seconds at 1M items)
and stores it in the forest (``default_search_k``, saved with it), so every query that gives no
``search_k`` gets the target recall at the least work measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .forest import HyperplaneForest

#: Candidate counts tried, ascending (about x1.25 apart). It starts at 200 (20 k for k = 10): below
#: that the leaf ranking, not the candidates, is the work of a query, so fewer saves nothing, and a
#: catalog of at most 200 tracks is answered exactly.
LADDER: tuple[int, ...] = (
    200, 250, 300, 400, 500, 650, 800, 1000, 1300, 1600, 2000, 2500, 3200, 4000, 5000, 6500, 8000,
    10_000, 13_000, 16_000, 20_000, 25_000, 32_000, 40_000,
)  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """The chosen ``search_k`` and what was measured: ``points`` = ``(search_k, recall@k)`` ascending,
    over ``queries`` sampled queries; ``reached`` is False when no ladder value reached ``target``
    (then ``search_k`` is the last one tried)."""

    search_k: int
    target: float
    k: int
    queries: int
    reached: bool
    points: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["points"] = [[int(s), round(float(r), 4)] for s, r in self.points]
        return out


def recall_at_k(found: np.ndarray, truth: np.ndarray, pad: Any) -> float:
    """Mean share of each query's true top-k (``truth (nq, k)``, ``pad`` where fewer exist) in ``found``."""
    hits = total = 0
    for f, t in zip(found.tolist(), truth.tolist()):
        want = {x for x in t if x != pad}
        hits += len(want.intersection(f))
        total += len(want)
    return hits / total if total else 1.0


def calibrate(
    forest: HyperplaneForest,
    queries: np.ndarray,
    target: float = 0.95,
    k: int = 10,
    ladder: tuple[int, ...] = LADDER,
) -> Calibration:
    """Measure recall@k of ``forest`` on ``queries (nq, dim)`` at each ``ladder`` value until one
    reaches ``target``, set ``forest.default_search_k`` to it and return the measurements.

    The queries should look like the ones served (user vectors for an inner-product forest, track
    vectors for a cosine one); a few hundred give the recall to about +-0.01.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target recall must be in (0, 1]; got {target}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    truth, _ = forest.query_batch(q, k=k, exact=True)
    pad = "" if forest.id_kind == "str" else -1
    points: list[tuple[int, float]] = []
    chosen, reached = int(ladder[-1]), False
    for search_k in ladder:
        found, _ = forest.query_batch(q, k=k, search_k=int(search_k))
        points.append((int(search_k), recall_at_k(found, truth, pad)))
        if points[-1][1] >= target:
            chosen, reached = int(search_k), True
            break
        if search_k >= len(forest):  # every item is a candidate already
            chosen = int(search_k)
            break
    forest.default_search_k = chosen
    return Calibration(chosen, float(target), int(k), len(q), reached, points)
