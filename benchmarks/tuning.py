"""`playrec train --tune` against the fixed defaults and against the best point of its own grid.

For each data set: the DESIGN.md section 5 split (20% per user, the latest by timestamp where known, seed
0); the defaults (log, alpha 2, reg 20) trained on the training part; the tuner (batch.tuning, default
settings) on the training part only, its choice trained on the training part; and every grid point trained
the full 20 iterations on the training part (the best of them on the TEST metrics is the ceiling a tuner
could reach). Reports test P@10, NDCG@10, MPR, the tuner's seconds against one plain fit on all plays
(median of 3), and the tuned/best-grid ratio.

Data sets: Last.fm 2K, MovieLens 100K (binarised), variants derived from Last.fm whose best settings
differ: counts x10, counts binarised, a 30% user subsample (seed 0), and `synthetic`: Poisson plays from
known rank-16 factors, 3,000 users x 4,000 tracks (`_common.factor_synthetic`, seed 0).

    .venv/bin/python benchmarks/tuning.py                    # all six
    .venv/bin/python benchmarks/tuning.py --datasets lastfm --no-grid
    .venv/bin/python benchmarks/tuning.py --no-grid --png docs/img/tuning_search.png   # the search, plotted
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LASTFM, ML100K, factor_synthetic, markdown_table

from batch.als import AlsParams, train_als
from batch.evaluation import Metrics, holdout_split, ranking_metrics
from batch.plays import PlayCounts, read_play_counts
from batch.training import tune_on_training_part
from batch.tuning import REFINE_MIN_GAIN, TuneResult, TuneSettings, candidate_grid

DATASETS = ("lastfm", "ml100k", "lastfm-x10", "lastfm-binary", "lastfm-users30", "synthetic")


def load(name: str) -> PlayCounts:
    """One of `DATASETS` as play counts (the Last.fm variants are derived from Last.fm 2K)."""
    if name not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "ml100k":
        return read_play_counts(ML100K, binarize=True)
    if name == "synthetic":
        m = factor_synthetic().plays
        ids = np.arange(max(m.shape)).astype(str)
        return PlayCounts(m, ids[: m.shape[0]], ids[: m.shape[1]])
    counts = read_play_counts(LASTFM)
    m = counts.matrix.astype(np.float32)
    if name == "lastfm-x10":
        m = m * 10
    elif name == "lastfm-binary":
        m = (m > 0).astype(np.float32)
    elif name == "lastfm-users30":
        keep = np.sort(np.random.default_rng(0).choice(m.shape[0], int(0.3 * m.shape[0]), replace=False))
        m = m[keep]
        cols = np.flatnonzero(np.diff(m.tocsc().indptr) > 0)
        m = m[:, cols]
        return PlayCounts(sp.csr_matrix(m), counts.user_ids[keep], counts.item_ids[cols])
    return PlayCounts(sp.csr_matrix(m), counts.user_ids, counts.item_ids, counts.last_played)


EASE_LAMBDAS = (50.0, 200.0, 500.0, 2000.0)


def ease_item_weights(train: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE (Steck 2019), closed form on the binarised plays: B = I - P / diag(P), P = (X^T X + lam I)^-1,
    zero diagonal; (n_items, n_items) float32. O(n_items^3) and two n_items^2 float64 arrays: for catalogues
    up to ~20K tracks."""
    X = (sp.csr_matrix(train) > 0).astype(np.float64)
    gram = (X.T @ X).toarray()
    gram[np.diag_indices_from(gram)] += lam
    # numpy's inverse (LU), not LAPACK's Cholesky inverse: scipy's bundled OpenBLAS dpotri segfaulted on
    # Last.fm's 17.6K x 17.6K Gram matrix twice (kernel log: libscipy_openblas, error 7), killing the run
    P = np.linalg.inv(gram)
    del gram
    P /= -np.diag(P).copy()[None, :]
    P[np.diag_indices_from(P)] = 0.0
    return P.astype(np.float32)


def ease_metrics(
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    train_ts: sp.csr_matrix | None = None,
    lambdas: tuple[float, ...] = EASE_LAMBDAS,
    widen: int = 2,
) -> tuple[Metrics, float]:
    """EASE with lambda chosen on a validation split of `train` (seed 1 like the tuner; each user's latest
    tracks when `train_ts`, aligned with `train`, is given), scored on test: (test metrics, lambda).
    A choice at either end of `lambdas` widens the list by x4 steps, at most `widen` times."""
    fit_part, valid = holdout_split(train, 0.2, seed=1, timestamps=train_ts)
    dense = (fit_part > 0).astype(np.float32).toarray()
    scores: dict[float, float] = {}

    def validate(lam: float) -> None:
        B = ease_item_weights(fit_part, lam)
        scores[lam] = ranking_metrics(dense, B.T, fit_part, valid, 10, 2000, percentile_ranks=False).ndcg

    for lam in lambdas:
        validate(lam)
    for _ in range(widen):
        best = max(scores, key=scores.get)
        if best == min(scores):
            validate(best / 4)
        elif best == max(scores):
            validate(best * 4)
        else:
            break
    best_lam = max(scores, key=scores.get)
    B = ease_item_weights(train, best_lam)
    return ranking_metrics((train > 0).astype(np.float32).toarray(), B.T, train, test, 10), best_lam


def plot_searches(searches: dict[str, TuneResult], path: Path) -> None:
    """One panel per data set: every trial at (alpha, reg / alpha) coloured by its validation NDCG@10, one
    marker per family (confidence form x reg_exp), the refinement's walk as a line, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {("log", 0.0): "o", ("log", 1.0): "s", ("linear", 0.0): "^", ("linear", 1.0): "v"}
    fig, axes = plt.subplots(1, len(searches), figsize=(4.2 * len(searches), 4.0), squeeze=False)
    for ax, (name, result) in zip(axes[0], searches.items(), strict=True):
        trials = result.trials
        lo, hi = min(t.ndcg for t in trials), max(t.ndcg for t in trials)
        for (confidence, reg_exp), marker in markers.items():
            ts = [t for t in trials if (t.confidence, t.reg_exp) == (confidence, reg_exp)]
            if ts:
                points = ax.scatter(
                    [t.alpha for t in ts],
                    [t.reg / t.alpha for t in ts],
                    c=[t.ndcg for t in ts],
                    vmin=lo,
                    vmax=hi,
                    cmap="viridis",
                    marker=marker,
                    edgecolors=["red" if t.stage == "refine" else "black" for t in ts],
                    label=f"{confidence} E{reg_exp:g}",
                )
        # the walk: from the best screen (when it beats the given parameters by the margin), each move that
        # beat its centre by the margin (batch.tuning's rule)
        base_trial = trials[0]
        best = max((t for t in trials if t.stage == "screen"), key=lambda t: t.ndcg, default=base_trial)
        walk = [best if best.ndcg > base_trial.ndcg * (1 + REFINE_MIN_GAIN) else base_trial]
        for t in trials:
            if t.stage == "refine" and t.ndcg > walk[-1].ndcg * (1 + REFINE_MIN_GAIN):
                walk.append(t)
        ax.plot([t.alpha for t in walk], [t.reg / t.alpha for t in walk], color="red", lw=1.0)
        c = result.choice
        ax.scatter([c.alpha], [c.reg / c.alpha], s=220, facecolors="none", edgecolors="red", lw=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("alpha")
        ax.set_ylabel("reg / alpha")
        ax.set_title(f"{name}: {c.confidence} {c.alpha:g} / {c.reg:g} E{c.reg_exp:g}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        fig.colorbar(points, ax=ax, label="validation NDCG@10")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("playrec --tune: screened (black edge) and refinement (red edge, walk in red); circled: choice")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--no-grid", action="store_true", help="skip the full grid (the ceiling)")
    parser.add_argument("--ease", action="store_true", help="add EASE (lambda by validation; <= 20K tracks)")
    parser.add_argument("--png", type=Path, help="plot each data set's search (its trials and walk) into this PNG")
    args = parser.parse_args()
    searches: dict[str, TuneResult] = {}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; load {os.getloadavg()}")
    rows = []
    for name in args.datasets.split(","):
        counts = load(name)
        base = AlsParams()
        train, test = holdout_split(counts.matrix, 0.2, seed=0, timestamps=counts.last_played)

        def test_metrics(params: AlsParams, train: sp.csr_matrix = train, test: sp.csr_matrix = test):
            fit = train_als(train, params, show_progress=False, compute_loss=False)
            return ranking_metrics(fit.user_factors, fit.item_factors, train, test, 10)

        plain = []
        for _ in range(3):
            t0 = time.perf_counter()
            train_als(counts.matrix, base, show_progress=False, compute_loss=False)
            plain.append(time.perf_counter() - t0)
        plain_s = float(np.median(plain))
        default = test_metrics(base)
        tuned_result = tune_on_training_part(counts, base, TuneSettings(), 0.2, show_progress=False)
        searches[name] = tuned_result
        tuned = test_metrics(tuned_result.choice)
        best, best_params = None, None
        if not args.no_grid:
            for params in candidate_grid(base):
                m = test_metrics(params)
                if best is None or m.ndcg > best.ndcg:
                    best, best_params = m, params
        c = tuned_result.choice
        ease = "-"
        if args.ease and counts.matrix.shape[1] <= 20_000:
            e, lam = ease_metrics(train, test)
            ease = f"{e.precision:.4f} / {e.ndcg:.4f} / {100 * e.mpr:.2f}% (lambda {lam:g})"
            ease += f"; tuned/EASE {tuned.ndcg / e.ndcg:.3f}"
        rows.append(
            [
                name,
                f"{default.precision:.4f} / {default.ndcg:.4f} / {100 * default.mpr:.2f}%",
                f"{tuned.precision:.4f} / {tuned.ndcg:.4f} / {100 * tuned.mpr:.2f}%",
                f"{c.confidence} {c.alpha:g} / {c.reg:g}" + (f" E {c.reg_exp:g}" if c.reg_exp else ""),
                f"{tuned_result.seconds:.1f} s = {tuned_result.seconds / plain_s:.1f}x",
                "-"
                if best is None
                else f"{best.precision:.4f} / {best.ndcg:.4f} ({best_params.confidence} "
                f"{best_params.alpha:g} / {best_params.reg:g})",
                "-" if best is None else f"{tuned.ndcg / best.ndcg:.3f}",
                f"{tuned.ndcg / default.ndcg:.3f}",
                ease,
            ]
        )
        print(rows[-1], flush=True)
    print()
    print(
        markdown_table(
            [
                "data set",
                "defaults P / NDCG / MPR",
                "--tune P / NDCG / MPR",
                "tuned choice",
                "tune time (x plain fit)",
                "best grid point (test) P / NDCG",
                "tuned / best NDCG",
                "tuned / defaults NDCG",
                "EASE P / NDCG / MPR",
            ],
            rows,
        )
    )
    if args.png:
        plot_searches(searches, args.png)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
