"""The periodic retrain: snapshot the stream's counts, train, evaluate, gate, publish, announce.

One cycle (`retrain_once`):

1. snapshot the workers' counts from Kafka up to a watermark (batch.snapshot);
2. split every user's tracks into train/holdout (seeded) and train the candidate on the train split;
3. evaluate the candidate and the live model on the same holdout: the live model folds each user in
   from the same training counts against its own item factors (tracks it does not know score zero);
4. gate: publish only if the candidate's metric is not worse than the live one's by more than the
   tolerance (relative); otherwise keep the live model and say why;
5. train the published model on all counts, build the forests, write a report (report.json,
   loss.png, metrics.png) into the version, publish atomically and announce it on model-updates.

A cycle killed at any point leaves the live model untouched: nothing is visible before the atomic
publish, and a half-written staging directory is removed by the next publish.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batch.als import AlsParams
from batch.evaluation import Metrics, holdout_split, popularity_factors, ranking_metrics
from batch.foldin import fold_in_users
from batch.forests import ForestParams
from batch.model_store import Model, ModelStore, ModelStoreError
from batch.plays import PlayCounts
from batch.report import history, write_report
from batch.snapshot import snapshot_counts
from batch.training import EVAL_MAX_USERS, Trainer, numpy_trainer, train_and_publish

log = logging.getLogger(__name__)

GATE_METRICS = ("ndcg", "precision", "recall", "mpr")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


class RetrainError(RuntimeError):
    """A retrain cycle cannot run as configured."""


def parse_duration(text: str) -> float:
    """'90s', '30m', '6h', '1d' or plain seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise RetrainError(f"cannot read duration {text!r}: use e.g. 90s, 30m, 6h or 1d")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if value <= 0:
        raise RetrainError(f"duration must be positive, got {text!r}")
    return value


@dataclass
class RetrainConfig:
    """What one retrain cycle needs."""

    store: ModelStore
    bootstrap: str
    app_id: str = "playrec"
    params: AlsParams = field(default_factory=AlsParams)
    holdout: float = 0.2
    tolerance: float = 0.02
    metric: str = "ndcg"
    forest: ForestParams | None = field(default_factory=ForestParams)
    trainer: Trainer = numpy_trainer
    announce: Callable[[str], None] | None = None
    skip_bad_records: bool = False
    client_kwargs: dict | None = None
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise RetrainError(f"gate metric must be one of {', '.join(GATE_METRICS)}, got {self.metric!r}")
        if not 0 <= self.tolerance < 1:
            raise RetrainError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if not 0 < self.holdout < 1:
            raise RetrainError(f"holdout must be in (0, 1), got {self.holdout}")


@dataclass
class RetrainOutcome:
    """What a cycle decided: `published` is False when the gate kept the live model."""

    published: bool
    reason: str
    version: str | None
    candidate: Metrics
    live: Metrics | None
    live_version: str | None
    timings: dict[str, float]


def live_model_metrics(live: Model, counts: PlayCounts, train: Any, test: Any, k: int = 10, seed: int = 0) -> Metrics:
    """Holdout metrics of a published model on new data: users folded in from their training counts."""
    params = live.manifest.get("parameters") or {}
    live_params = AlsParams(**params) if params else AlsParams(factors=live.factors)
    rows = np.array([live.item_index.get(str(t), -1) for t in counts.item_ids.tolist()], dtype=np.int64)
    known = rows >= 0
    Y_live = np.asarray(live.item_factors, dtype=np.float32)
    Y = np.zeros((len(rows), live.factors), dtype=np.float32)
    Y[known] = Y_live[rows[known]]
    gram = Y_live.astype(np.float64).T @ Y_live.astype(np.float64)
    X = fold_in_users(train, Y, live_params, gram=gram)
    return ranking_metrics(X, Y, train, test, k, EVAL_MAX_USERS, seed)


def gate(candidate: Metrics, live: Metrics | None, metric: str, tolerance: float) -> tuple[bool, str]:
    """(publish?, why). MPR is lower-is-better; the others higher-is-better."""
    if live is None:
        return True, "no live model: publishing the first one"
    new, old = getattr(candidate, metric), getattr(live, metric)
    ok = new <= old * (1 + tolerance) if metric == "mpr" else new >= old * (1 - tolerance)
    verdict = "passes" if ok else "fails"
    return ok, f"candidate {metric} {new:.4f} vs live {old:.4f}: {verdict} the gate (tolerance {tolerance:.0%})"


def retrain_once(config: RetrainConfig) -> RetrainOutcome:
    """Run one snapshot -> train -> evaluate -> gate -> publish cycle."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    snap = snapshot_counts(config.bootstrap, config.app_id, config.skip_bad_records, client_kwargs=config.client_kwargs)
    counts = snap.counts
    timings["snapshot_s"] = time.perf_counter() - start
    log.info("snapshot: %d users x %d tracks, %d counts", *counts.shape, counts.nnz)
    start = time.perf_counter()
    train, test = holdout_split(counts.matrix, config.holdout, seed=config.params.seed)
    candidate_result = config.trainer(train, config.params, config.show_progress)
    candidate = ranking_metrics(
        candidate_result.user_factors,
        candidate_result.item_factors,
        train,
        test,
        10,
        EVAL_MAX_USERS,
        config.params.seed,
    )
    baseline = ranking_metrics(*popularity_factors(train), train, test, 10, EVAL_MAX_USERS, config.params.seed)
    timings["evaluate_s"] = time.perf_counter() - start
    try:
        live_model = config.store.load()
    except ModelStoreError as exc:
        log.info("no live model to compare with (%s)", exc)
        live_model = None
    live = live_model_metrics(live_model, counts, train, test, seed=config.params.seed) if live_model else None
    ok, reason = gate(candidate, live, config.metric, config.tolerance)
    log.info("gate: %s", reason)
    live_version = live_model.version if live_model else None
    if not ok:
        return RetrainOutcome(False, reason, None, candidate, live, live_version, timings)
    past = history(config.store)
    body = {
        "gate": {"published": True, "reason": reason, "metric": config.metric, "tolerance": config.tolerance},
        "new": candidate.to_dict(),
        "live": live.to_dict() if live else None,
        "live_version": live_version,
        "popularity": baseline.to_dict(),
        "watermark": snap.source(),
        "timings": timings,
    }

    def report(directory, result) -> dict:
        return write_report(directory, {**body, "losses": result.losses}, result.losses, past)

    start = time.perf_counter()
    published = train_and_publish(
        counts,
        config.store,
        config.params,
        holdout=config.holdout,
        source=snap.source(),
        extra=report,
        show_progress=config.show_progress,
        forest=config.forest,
        trainer=config.trainer,
        evaluation=(candidate, baseline),
        announce=config.announce,
    )
    timings["publish_s"] = time.perf_counter() - start
    return RetrainOutcome(True, reason, published.version, candidate, live, live_version, timings)


def retrain_forever(config: RetrainConfig, every_s: float, stop: threading.Event) -> None:
    """Run a cycle every `every_s` seconds until `stop` is set; a failed cycle is logged, not fatal."""
    while not stop.is_set():
        began = time.monotonic()
        try:
            outcome = retrain_once(config)
            log.info(
                "retrain cycle: %s (%s)",
                "published " + outcome.version if outcome.published else "kept the live model",
                outcome.reason,
            )
        except Exception:
            log.exception("retrain cycle failed; the live model stays; next try in %.0f s", every_s)
        stop.wait(max(0.0, every_s - (time.monotonic() - began)))
