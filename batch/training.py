"""The batch job: play counts -> evaluated ALS model -> published model version.

With a holdout fraction > 0 the job first trains on the per-user training split and evaluates
(the model and a popularity baseline) on the held-out plays, then trains the published model on all
plays with the same parameters and seed, so no user's data is left out of what is served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from batch.als import AlsParams, AlsResult, train_als
from batch.evaluation import Metrics, holdout_split, popularity_factors, ranking_metrics
from batch.forests import ForestParams, build_forests
from batch.model_store import ModelStore
from batch.plays import PlayCounts
from batch.tuning import TuneResult, TuneSettings, tune

log = logging.getLogger(__name__)

DEFAULT_FOREST = ForestParams()
#: Users sampled for evaluation on very large data (ranking every item for every user is O(n m k)).
EVAL_MAX_USERS = 20_000


@dataclass
class TrainReport:
    """What a training run did; `metrics`/`baseline` are None when evaluation was skipped."""

    version: str
    params: AlsParams
    metrics: Metrics | None
    baseline: Metrics | None
    losses: list[float]
    seconds_per_iteration: float
    timings: dict[str, float] = field(default_factory=dict)
    tuning: TuneResult | None = None


Trainer = Callable[[sp.csr_matrix, AlsParams, bool], AlsResult]


def numpy_trainer(plays: sp.csr_matrix, params: AlsParams, show_progress: bool) -> AlsResult:
    """The default engine: playrec's own ALS (batch.als)."""
    return train_als(plays, params, show_progress=show_progress)


def evaluate_params(
    counts: PlayCounts,
    params: AlsParams,
    holdout: float = 0.2,
    k: int = 10,
    show_progress: bool = True,
    trainer: Trainer = numpy_trainer,
) -> tuple[Metrics, Metrics, AlsResult]:
    """Train on a per-user split and rank the held-out plays: (model metrics, popularity, result)."""
    train, test = holdout_split(counts.matrix, holdout, seed=params.seed, timestamps=counts.last_played)
    result = trainer(train, params, show_progress)
    metrics = ranking_metrics(result.user_factors, result.item_factors, train, test, k, EVAL_MAX_USERS, params.seed)
    baseline = ranking_metrics(*popularity_factors(train), train, test, k, EVAL_MAX_USERS, params.seed)
    return metrics, baseline, result


def train_and_publish(
    counts: PlayCounts,
    store: ModelStore,
    params: AlsParams,
    holdout: float = 0.2,
    k: int = 10,
    source: dict[str, Any] | None = None,
    extra: Callable[[Path, AlsResult], dict[str, Any] | None] | None = None,
    show_progress: bool = True,
    forest: ForestParams | None = DEFAULT_FOREST,
    trainer: Trainer = numpy_trainer,
    evaluation: tuple[Metrics, Metrics] | None = None,
    announce: Callable[[str], None] | None = None,
    history: sp.csr_matrix | None = None,
    lineage: dict[str, Any] | None = None,
    tuning: TuneSettings | TuneResult | None = None,
) -> TrainReport:
    """Evaluate (unless holdout == 0), train on all plays, build the forests and publish to `store`.

    source: manifest description of the input (path, checksum or Kafka offsets = the watermark).
    extra(directory, result): writes further artifacts (e.g. a retrain report) into the new version.
    forest: shape of the search forests built into the version (None: no index, exact scoring).
    trainer: the ALS engine (numpy by default; batch.spark_engine for Spark).
    evaluation: (model, popularity) metrics computed already (the retrain gate), instead of holdout.
    announce(version): called after the version is live (e.g. a model-updates record).
    history: the part of `counts` the stream does not hold (CSR aligned with it), stored as
    history_*.npy; lineage: the manifest's `history` and `lineage` fields (batch.history). Neither
    given: `counts` is all history (a file), which the workers add to what streams.
    tuning: choose confidence, alpha and reg first (batch.tuning) on a validation split of the plays the
    holdout evaluation trains on (all plays with holdout 0), so the reported holdout is never seen;
    `params` gives the rest (factors, iterations, seed) and the published parameters are the choice. A
    `TuneResult` is a search run already (the retrain's, on the gate's training part): its choice is used.
    """
    timings: dict[str, float] = {}
    metrics, baseline = evaluation if evaluation is not None else (None, None)
    tuned: TuneResult | None = None
    if isinstance(tuning, TuneResult):
        tuned, params = tuning, tuning.choice
    elif tuning is not None:
        start = time.perf_counter()
        tuned = tune_on_training_part(counts, params, tuning, holdout if evaluation is None else 0.0, show_progress)
        params = tuned.choice
        timings["tune_s"] = time.perf_counter() - start
    if holdout > 0 and evaluation is None:
        start = time.perf_counter()
        metrics, baseline, _ = evaluate_params(counts, params, holdout, k, show_progress, trainer)
        timings["evaluate_s"] = time.perf_counter() - start
        log.info("holdout evaluation: %s", metrics.describe())
        log.info("popularity baseline: %s", baseline.describe())
    start = time.perf_counter()
    result = trainer(counts.matrix, params, show_progress)
    timings["train_s"] = time.perf_counter() - start
    version = publish_result(
        counts,
        result,
        store,
        params,
        metrics=(metrics, baseline) if metrics is not None else None,
        holdout=holdout,
        source=source,
        extra=extra,
        forest=forest,
        history=history,
        lineage=lineage,
        engine=getattr(trainer, "engine", "numpy"),
        timings=timings,
        tuning=tuned.to_dict() if tuned is not None else None,
    )
    if announce is not None:
        announce(version)
    return TrainReport(
        version=version,
        params=params,
        metrics=metrics,
        baseline=baseline,
        losses=result.losses,
        seconds_per_iteration=float(np.median(result.seconds)) if result.seconds else 0.0,
        timings=timings,
        tuning=tuned,
    )


def tune_on_training_part(
    counts: PlayCounts, params: AlsParams, settings: TuneSettings, holdout: float, show_progress: bool = True
) -> TuneResult:
    """`batch.tuning.tune` on the part of `counts` that the holdout evaluation trains on (the same split:
    `params.seed`, latest tracks by timestamp where known), or on all of it with holdout 0."""
    matrix, stamps = counts.matrix, counts.last_played
    if holdout > 0:
        matrix, _ = holdout_split(counts.matrix, holdout, seed=params.seed, timestamps=counts.last_played)
        if stamps is not None:
            matrix.sort_indices()
            rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
            values = np.asarray(sp.csr_matrix(stamps)[rows, matrix.indices]).ravel()
            stamps = sp.csr_matrix((values, matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape)
    return tune(matrix, params, settings, timestamps=stamps, show_progress=show_progress)


def publish_result(
    counts: PlayCounts,
    result: AlsResult,
    store: ModelStore,
    params: AlsParams,
    metrics: tuple[Metrics, Metrics] | None = None,
    holdout: float = 0.0,
    source: dict[str, Any] | None = None,
    extra: Callable[[Path, AlsResult], dict[str, Any] | None] | None = None,
    forest: ForestParams | None = DEFAULT_FOREST,
    history: sp.csr_matrix | None = None,
    lineage: dict[str, Any] | None = None,
    engine: str = "numpy",
    timings: dict[str, float] | None = None,
    tuning: dict[str, Any] | None = None,
) -> str:
    """Publish trained factors as a new CURRENT version of `store`: the factors, the training counts
    (plays_*.npy), `history` (history_*.npy), the forests (unless `forest` is None) and the manifest
    (parameters, input, (model, popularity) `metrics` on `holdout`, lineage, losses, timings).
    Returns the version name. Used by `train_and_publish` and by the Python API's `ModelStore.publish`."""
    timings = timings if timings is not None else {}
    model_metrics, baseline = metrics if metrics is not None else (None, None)
    matrix = counts.matrix

    def write_artifacts(directory: Path) -> dict[str, Any]:
        np.save(directory / "plays_indptr.npy", matrix.indptr.astype(np.int64), allow_pickle=False)
        np.save(directory / "plays_indices.npy", matrix.indices.astype(np.int32), allow_pickle=False)
        np.save(directory / "plays_counts.npy", matrix.data.astype(np.float32), allow_pickle=False)
        if history is not None:
            np.save(directory / "history_indptr.npy", history.indptr.astype(np.int64), allow_pickle=False)
            np.save(directory / "history_indices.npy", history.indices.astype(np.int32), allow_pickle=False)
            np.save(directory / "history_counts.npy", history.data.astype(np.float32), allow_pickle=False)
        fields: dict[str, Any] = {}
        if forest is not None:
            begin = time.perf_counter()
            fields.update(build_forests(directory, counts.item_ids, result.item_factors, forest, result.user_factors))
            timings["index_s"] = time.perf_counter() - begin
        if extra is not None:
            fields.update(extra(directory, result) or {})
        return fields

    start = time.perf_counter()
    version = store.publish(
        counts.user_ids,
        counts.item_ids,
        result.user_factors,
        result.item_factors,
        manifest={
            "parameters": params.to_dict(),
            "input": {**(source or {}), "plays": int(matrix.nnz), "summary": counts.summary.describe()},
            "metrics": {
                "holdout": holdout,
                "model": model_metrics.to_dict() if model_metrics else None,
                "popularity": baseline.to_dict() if baseline else None,
            },
            **(lineage if lineage is not None else {"history": {"arrays": "plays"}, "lineage": []}),
            "training": {
                "engine": engine,
                "losses": result.losses,
                "seconds_per_iteration": float(np.median(result.seconds)) if result.seconds else 0.0,
                "timings": timings,
                **({"tuning": tuning} if tuning is not None else {}),
            },
        },
        extra=write_artifacts,
    )
    timings["publish_s"] = time.perf_counter() - start
    return version
