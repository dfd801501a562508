"""The Python API: train, query, evaluate and publish a model in a notebook, without a broker.

    from playrec import ALS, PlayCounts, ModelStore
    counts = PlayCounts.from_file("user_artists.dat")      # as `playrec train --plays`
    model = ALS(factors=40).fit(counts)                     # `playrec train`'s defaults
    model.recommend("2", k=10)                              # [Scored(track, score), ...], best first

`ALSModel` is a thin face of `batch.serving.ServingModel`, the one serving model that
`playrec recommend/similar` and the stream worker answer with too (its docstring states the rule for
exact vs forest search); `ALS.fit`, `ALSModel.evaluate` and `ModelStore.publish` run the same functions
as `playrec train` (batch.training), so the same data and parameters give the same factors, metrics
and model versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from batch import model_store
from batch.als import AlsParams, AlsResult
from batch.evaluation import Metrics
from batch.forests import ForestParams, make_forests
from batch.plays import PlayCounts
from batch.serving import EXACT_SCAN_ITEMS, Scored, SearchMode, ServingModel, UnknownTrackError, csr_arrays
from batch.training import evaluate_params, numpy_trainer, publish_result
from batch.tuning import TuneResult, TuneSettings, tune

__all__ = ["ALS", "ALSModel", "Evaluation", "ModelStore", "PlayCounts", "Scored"]

UNPUBLISHED = "unpublished"


@dataclass(frozen=True)
class Evaluation:
    """Holdout metrics of a model and of the popularity baseline, as `playrec train` reports them."""

    holdout: float
    model: Metrics
    popularity: Metrics

    def to_dict(self) -> dict:
        return {"holdout": self.holdout, "model": self.model.to_dict(), "popularity": self.popularity.to_dict()}


class ALS:
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008); every default is `playrec train`'s."""

    def __init__(
        self,
        factors: int = AlsParams.factors,
        iterations: int = AlsParams.iterations,
        alpha: float = AlsParams.alpha,
        reg: float = AlsParams.reg,
        reg_exp: float = AlsParams.reg_exp,
        confidence: str = AlsParams.confidence,
        eps: float = AlsParams.eps,
        solver: str = AlsParams.solver,
        cg_steps: int = AlsParams.cg_steps,
        seed: int = AlsParams.seed,
        show_progress: bool = False,
        tune: bool = False,
        tune_budget: float = 5.0,
    ) -> None:
        self.params = AlsParams(
            factors=factors,
            iterations=iterations,
            alpha=alpha,
            reg=reg,
            reg_exp=reg_exp,
            confidence=confidence,
            eps=eps,
            solver=solver,
            cg_steps=cg_steps,
            seed=seed,
        )
        self.show_progress = show_progress
        #: `playrec train --tune`: fit() first chooses confidence, alpha, reg and reg_exp on a validation
        #: split of the plays (batch.tuning, at most `tune_budget` plain fits); the search is kept in `tuning`
        self.tune_settings = TuneSettings(budget=tune_budget) if tune else None
        self.tuning: TuneResult | None = None

    def __repr__(self) -> str:
        return f"ALS({', '.join(f'{k}={v!r}' for k, v in self.params.to_dict().items())})"

    def fit(self, counts: PlayCounts, search: SearchMode = "auto") -> ALSModel:
        """Train on `counts` (all of them) and return the fitted model (float32 factors); with `tune=True`
        the parameters are chosen first (`self.tuning` holds every trial; the model's `params` the choice)."""
        if not isinstance(counts, PlayCounts):
            raise TypeError(
                f"fit() takes PlayCounts (PlayCounts.from_file or .from_arrays), got {type(counts).__name__}"
            )
        params = self.params
        if self.tune_settings is not None:
            self.tuning = tune(
                counts.matrix, params, self.tune_settings, counts.last_played, show_progress=self.show_progress
            )
            params = self.tuning.choice
        result = numpy_trainer(counts.matrix, params, self.show_progress)
        return ALSModel.from_result(counts, result, params, search=search)


class ALSModel:
    """A fitted or loaded model: recommendations, similar tracks, fold-in, explanations, evaluation.

    Results are lists of `Scored(track, score)` NamedTuples, best first.
    """

    def __init__(self, serving: ServingModel, counts: PlayCounts | None, losses: Sequence[float] = ()) -> None:
        self.serving = serving
        self.counts = counts
        self.losses = list(losses)
        self.evaluation: Evaluation | None = None

    @classmethod
    def from_result(
        cls, counts: PlayCounts, result: AlsResult, params: AlsParams, search: SearchMode = "auto"
    ) -> ALSModel:
        """A model over trained factors, in memory (forests are built only when the search rule uses them)."""
        model = model_store.Model(
            version=UNPUBLISHED,
            path=Path(),
            manifest={"parameters": params.to_dict()},
            user_ids=np.asarray(counts.user_ids).astype(str),
            item_ids=np.asarray(counts.item_ids).astype(str),
            user_factors=np.ascontiguousarray(result.user_factors, dtype=np.float32),
            item_factors=np.ascontiguousarray(result.item_factors, dtype=np.float32),
        )
        forests = None
        if search == "forest" or (search == "auto" and len(model.item_ids) > EXACT_SCAN_ITEMS):
            forests = make_forests(
                model.item_ids, model.item_factors, ForestParams(seed=params.seed), model.user_factors
            )
        return cls(ServingModel(model, csr_arrays(counts.matrix), forests, search=search), counts, result.losses)

    def __repr__(self) -> str:
        return (
            f"ALSModel(version={self.version!r}, users={len(self.user_ids):,}, tracks={len(self.item_ids):,}, "
            f"factors={self.params.factors})"
        )

    # -- what it is --------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """The model store version, or "unpublished"."""
        return self.serving.version

    @property
    def params(self) -> AlsParams:
        return self.serving.params

    @property
    def user_ids(self) -> np.ndarray:
        return self.serving.model.user_ids

    @property
    def item_ids(self) -> np.ndarray:
        return self.serving.model.item_ids

    @property
    def user_factors(self) -> np.ndarray:
        """(n_users, k) float32, rows aligned with `user_ids`."""
        return self.serving.model.user_factors

    @property
    def item_factors(self) -> np.ndarray:
        """(n_items, k) float32, rows aligned with `item_ids`."""
        return self.serving.model.item_factors

    # -- queries -----------------------------------------------------------------------------
    def recommend(
        self, user: str | np.ndarray, k: int = 10, exclude_streamed: bool = True, exclude: Iterable[str] = ()
    ) -> list[Scored]:
        """Top-k tracks for a user id (tracks they streamed excluded unless `exclude_streamed=False`) or
        for a user vector (k,) such as `fold_in`'s (never returning `exclude`)."""
        if isinstance(user, str):
            return self.serving.recommend_users([user], k, exclude_streamed, [exclude])[0]
        return self.serving.recommend_vector(user, k, exclude)

    def recommend_batch(self, users: Sequence[str], k: int = 10, exclude_streamed: bool = True) -> list[list[Scored]]:
        """`recommend` for many user ids at once (scored together): one list per user, in order."""
        return self.serving.recommend_users(list(users), k, exclude_streamed)

    def similar(self, track: str, k: int = 10) -> list[Scored]:
        """The k tracks closest to `track` by cosine of item vectors (the track itself excluded)."""
        return self.serving.similar(track, k)

    def fold_in(self, plays: Mapping[str, float]) -> np.ndarray:
        """A new listener's vector (k,) float32 from their counts {track: streams}: the exact ALS user
        half-step against the model's item factors (batch.foldin). Unknown tracks are ignored; raises
        `UnknownTrackError` when none is known. Recommend with `model.recommend(vector, exclude=plays)`."""
        vector = self.serving.fold_in(plays)
        if vector is None:
            raise UnknownTrackError(f"none of the {len(plays)} tracks is in model {self.version}: nothing to fold in")
        return vector

    def explain(self, user: str, track: str, top: int = 10) -> dict:
        """Why `track` scores as it does for `user`: {"track", "score", "contributions": [{"track",
        "contribution", "plays"}, ...]}, the user's streamed tracks with the largest shares first."""
        return self.serving.explain(user, track, top)

    def evaluate(self, holdout: float = 0.2, k: int = 10) -> Evaluation:
        """Retrain with the same parameters on a per-user split holding out `holdout` of each user's tracks
        (the latest ones when the counts have timestamps) and rank the held-out plays: the metrics
        `playrec train --holdout` reports, for the model and the popularity baseline."""
        if self.counts is None:
            raise model_store.ModelStoreError(f"model {self.version} keeps no play counts to evaluate on")
        metrics, baseline, _ = evaluate_params(self.counts, self.params, holdout, k, show_progress=False)
        self.evaluation = Evaluation(holdout, metrics, baseline)
        return self.evaluation


class ModelStore:
    """A directory of model versions (`playrec train --out`, the workers' `--store`)."""

    def __init__(self, root: str | Path, keep: int = 5) -> None:
        self.store = model_store.ModelStore(root, keep=keep)

    @property
    def root(self) -> Path:
        return self.store.root

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        return self.store.versions()

    def publish(self, model: ALSModel, index: bool = True) -> str:
        """Publish `model` as the new CURRENT version (with its search forests unless `index=False`, and
        its `evaluate` metrics if it was evaluated), exactly as `playrec train` writes one; returns its name."""
        if model.counts is None:
            raise model_store.ModelStoreError(f"model {model.version} keeps no play counts to publish")
        result = AlsResult(model.user_factors, model.item_factors, losses=model.losses)
        evaluation = model.evaluation
        return publish_result(
            model.counts,
            result,
            self.store,
            model.params,
            metrics=(evaluation.model, evaluation.popularity) if evaluation else None,
            holdout=evaluation.holdout if evaluation else 0.0,
            source={"source": "python"},
            forest=ForestParams(seed=model.params.seed) if index else None,
        )

    def load(self, version: str | None = None, search: SearchMode = "auto") -> ALSModel:
        """A published version (default CURRENT), memory-mapped and checksum-verified, as an `ALSModel`."""
        serving = ServingModel.load(self.store.load(version), search=search)
        counts = None
        if serving.plays is not None:
            indptr, indices, data = serving.plays
            shape = (len(serving.model.user_ids), len(serving.model.item_ids))
            matrix = sp.csr_matrix((data, indices, indptr), shape=shape)
            counts = PlayCounts(matrix, serving.model.user_ids, serving.model.item_ids)
        losses = serving.model.manifest.get("training", {}).get("losses", [])
        return ALSModel(serving, counts, losses)
