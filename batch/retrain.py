"""The periodic retrain: history + the stream's counts -> train, evaluate, gate, publish, announce.

One cycle (`retrain_once`):

1. snapshot the workers' counts from Kafka up to a watermark (batch.snapshot) and merge them with the
   live model's history (batch.history): the input is exactly what the workers serve, history +
   streamed, every play once;
2. split every user's tracks of that whole input into train/holdout (seeded) and train the
   candidate on the train split;
3. evaluate both on the same holdout of every user: the candidate, and the live model's lineage
   replayed without the held-out plays (its parameters, trained on its own training counts minus
   the held-out pairs), so neither model has seen what it is judged on; users are folded in from the
   train split against each model's item factors, as the workers do (tracks the live model does not
   know score zero);
4. gate: publish only if the candidate's metric is not worse than the live one's by more than the
   tolerance (relative); otherwise keep the live model and say why;
5. train the published model on all counts, build the forests, write a report (report.json,
   loss.png, metrics.png) into the version with the history and lineage, publish atomically and
   announce it on model-updates.

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
import scipy.sparse as sp

from batch.als import AlsParams
from batch.evaluation import Metrics, holdout_split, popularity_factors, ranking_metrics
from batch.foldin import fold_in_users
from batch.forests import ForestParams
from batch.history import lineage_fields, merge_history, training_matrix
from batch.model_store import Model, ModelStore, ModelStoreError
from batch.plays import PlayCounts
from batch.report import history, write_report
from batch.snapshot import snapshot_counts
from batch.training import EVAL_MAX_USERS, Trainer, numpy_trainer, train_and_publish
from batch.tuning import TuneResult, TuneSettings, tune

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
    #: choose the parameters each cycle (batch.tuning) on a validation split of the gate's training part;
    #: warm-started around the live model's own tuned choice when it has one
    tuning: TuneSettings | None = None

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
    tuning: TuneResult | None = None  # the cycle's search (RetrainConfig.tuning)


def _params_of(model: Model) -> AlsParams:
    params = model.manifest.get("parameters") or {}
    return AlsParams(**params) if params else AlsParams(factors=model.factors)


def warm_start(live: Model | None) -> AlsParams | None:
    """The live model's parameters when a search chose them (its manifest's `training.tuning`): the next
    search looks around them (`candidate_grid(around=...)`); None: search the full grid."""
    if live is None or not (live.manifest.get("training") or {}).get("tuning"):
        return None
    return _params_of(live)


def foldin_metrics(
    item_factors: np.ndarray, params: AlsParams, train: Any, test: Any, k: int = 10, seed: int = 0
) -> Metrics:
    """Holdout metrics of item factors (n_items, f) as the workers serve them: each evaluated user
    (a seeded sample of at most EVAL_MAX_USERS) folded in from their train-split counts."""
    train, test = sp.csr_matrix(train), sp.csr_matrix(test)
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    if users.size > EVAL_MAX_USERS:
        users = np.sort(np.random.default_rng(seed).choice(users, EVAL_MAX_USERS, replace=False))
    Y = np.asarray(item_factors, dtype=np.float32)
    X = fold_in_users(train[users], Y, params)
    return ranking_metrics(X, Y, train[users], test[users], k, None, seed)


def live_model_metrics(live: Model, counts: PlayCounts, train: Any, test: Any, k: int = 10, seed: int = 0) -> Metrics:
    """Holdout metrics of the published live model's own item factors (users folded in from train).

    Biased towards the live model when it trained on held-out plays; the gate uses it only for a
    store that kept no training counts (`lineage_metrics`)."""
    rows = np.array([live.item_index.get(str(t), -1) for t in counts.item_ids.tolist()], dtype=np.int64)
    known = rows >= 0
    Y = np.zeros((len(rows), live.factors), dtype=np.float32)
    Y[known] = np.asarray(live.item_factors, dtype=np.float32)[rows[known]]
    return foldin_metrics(Y, _params_of(live), train, test, k, seed)


def lineage_metrics(
    live: Model,
    counts: PlayCounts,
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    trainer: Trainer,
    show_progress: bool = False,
    k: int = 10,
    seed: int = 0,
) -> tuple[Metrics, str]:
    """(metrics, how) of the live model's lineage judged without the held-out plays.

    Its parameters are trained on its own training counts minus every held-out (user, track) pair,
    in `counts`' id space (the live ids are a prefix); tracks it never trained on score zero."""
    trained = training_matrix(live, counts.shape)
    if trained is None:
        return live_model_metrics(live, counts, train, test, k, seed), "live artifact (no training counts kept)"
    held = sp.csr_matrix(test, copy=True)
    held.data[:] = 1.0
    replay_input = (trained - trained.multiply(held)).tocsr()
    replay_input.eliminate_zeros()
    params = _params_of(live)
    result = trainer(replay_input, params, show_progress)
    Y = np.array(result.item_factors, dtype=np.float32)
    listeners = np.diff(replay_input.tocsc().indptr)
    Y[listeners == 0] = 0.0  # tracks the replay never saw: unknown to the live model, as served
    return foldin_metrics(Y, params, train, test, k, seed), "live lineage replayed without the held-out plays"


def gate(candidate: Metrics, live: Metrics | None, metric: str, tolerance: float) -> tuple[bool, str]:
    """(publish?, why). MPR is lower-is-better; the others higher-is-better."""
    if live is None:
        return True, "no live model: publishing the first one"
    new, old = getattr(candidate, metric), getattr(live, metric)
    ok = new <= old * (1 + tolerance) if metric == "mpr" else new >= old * (1 - tolerance)
    verdict = "passes" if ok else "fails"
    return ok, f"candidate {metric} {new:.4f} vs live {old:.4f}: {verdict} the gate (tolerance {tolerance:.0%})"


#: The gate judges every user with at least this many streamed tracks (one held out from 2-4), not only
#: the >= 5 of the CLI's reported holdout: the stream's new listeners have few tracks, and a gate blind
#: to them judges a candidate that learnt from them only on the users it did not learn anything new for.
GATE_MIN_ITEMS = 2


def retrain_once(config: RetrainConfig) -> RetrainOutcome:
    """Run one snapshot -> merge -> train -> evaluate -> gate -> publish cycle."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    snap = snapshot_counts(config.bootstrap, config.app_id, config.skip_bad_records, client_kwargs=config.client_kwargs)
    timings["snapshot_s"] = time.perf_counter() - start
    log.info("snapshot: %d users x %d tracks, %d counts", *snap.counts.shape, snap.counts.nnz)
    try:
        live_model = config.store.load()
    except ModelStoreError as exc:
        log.info("no live model to compare with (%s)", exc)
        live_model = None
    start = time.perf_counter()
    merged = merge_history(live_model, snap.counts)
    counts = merged.counts
    timings["merge_s"] = time.perf_counter() - start
    log.info(
        "history + stream: %d users x %d tracks, %d counts (history %s)",
        *counts.shape,
        counts.nnz,
        "none" if merged.history is None else f"{merged.history.nnz:,} counts",
    )
    start = time.perf_counter()
    seed = config.params.seed
    train, test = holdout_split(counts.matrix, config.holdout, seed=seed, min_items=GATE_MIN_ITEMS)
    params, tuned = config.params, None
    if config.tuning is not None:
        around = warm_start(live_model)
        tuned = tune(train, config.params, config.tuning, around=around, show_progress=config.show_progress)
        params = tuned.choice
        timings["tune_s"] = tuned.seconds
        log.info("tuned (%s): %s", "around the live choice" if around else "full grid", params.to_dict())
    candidate_result = config.trainer(train, params, config.show_progress)
    candidate = foldin_metrics(candidate_result.item_factors, params, train, test, seed=seed)
    baseline = ranking_metrics(*popularity_factors(train), train, test, 10, EVAL_MAX_USERS, seed)
    timings["evaluate_s"] = time.perf_counter() - start - timings.get("tune_s", 0.0)  # (the search: tune_s)
    live, how = None, None
    if live_model is not None:
        start = time.perf_counter()
        live, how = lineage_metrics(live_model, counts, train, test, config.trainer, config.show_progress, seed=seed)
        timings["evaluate_live_s"] = time.perf_counter() - start
    ok, reason = gate(candidate, live, config.metric, config.tolerance)
    log.info("gate (%d users, live: %s): %s", candidate.users, how, reason)
    live_version = live_model.version if live_model else None
    if not ok:
        return RetrainOutcome(False, reason, None, candidate, live, live_version, timings, tuned)
    past = history(config.store)
    source = {**snap.source(), "source": "stream" if merged.history is None else "history+stream"}
    body = {
        "gate": {
            "published": True,
            "reason": reason,
            "metric": config.metric,
            "tolerance": config.tolerance,
            "live_evaluation": how,
        },
        "new": candidate.to_dict(),
        "live": live.to_dict() if live else None,
        "live_version": live_version,
        "popularity": baseline.to_dict(),
        "watermark": snap.source(),
        "timings": timings,
        **({"tuning": tuned.to_dict()} if tuned is not None else {}),
    }

    def report(directory, result) -> dict:
        return write_report(directory, {**body, "losses": result.losses}, result.losses, past)

    start = time.perf_counter()
    published = train_and_publish(
        counts,
        config.store,
        params,
        holdout=config.holdout,
        source=source,
        extra=report,
        show_progress=config.show_progress,
        forest=config.forest,
        trainer=config.trainer,
        evaluation=(candidate, baseline),
        announce=config.announce,
        history=merged.history,
        lineage=lineage_fields(live_model, merged.history),
        tuning=tuned,
    )
    timings["publish_s"] = time.perf_counter() - start
    return RetrainOutcome(True, reason, published.version, candidate, live, live_version, timings, tuned)


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
