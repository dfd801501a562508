"""Ranking quality of playrec's ALS against implicit and popularity, and a small hyper-parameter sweep.

Data sets (DESIGN.md section 5 protocol): Last.fm 2K (real play counts; random 20% per-user holdout,
seed 0, users with >= 5 artists) and MovieLens 100K (binarised ratings as plays; the latest 20% per
user by timestamp). Metrics at 10 over all items not in the user's training set: precision, recall,
NDCG and Hu et al.'s mean percentile rank (MPR, weighted by held-out play counts; lower is better).

1. Comparison: playrec, implicit 0.7 (CPU, CG 3 steps, the confidence matrix `1 + (c - 1)` with its
   alpha = 1, BLAS limited to one thread, the SAME initial factors) and popularity, at the given
   parameters (default: 40 factors, 15 iterations, log confidence alpha 1, reg 0.1) and at linear
   confidence alpha 1, reg 1 (DESIGN.md's second anchor).
2. Sweep (playrec only): confidence log/linear x alpha x reg. Selection is done on a VALIDATION split
   carved out of the training part the same way (seed 1 / latest 20% of the training part), so that
   the recommended defaults are not fitted to the test set; the table shows validation NDCG@10 and
   the test metrics of every setting.

    .venv/bin/python benchmarks/quality.py                 # comparison + sweep on both data sets
    .venv/bin/python benchmarks/quality.py --quick         # comparison + a 2 x 2 sweep
    .venv/bin/python benchmarks/quality.py --no-sweep --datasets lastfm
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Dataset,
    blas_single_thread,
    implicit_als,
    implicit_confidence,
    load_dataset,
    machine_notes,
    markdown_table,
)

from batch.als import AlsParams, initial_factors, train_als
from batch.confidence import confidence_matrix
from batch.evaluation import Metrics, holdout_split, popularity_factors, ranking_metrics

DATASETS = ("lastfm", "ml100k")
SWEEP = {
    "log": {"alpha": (0.5, 1.0, 2.0, 5.0, 10.0, 40.0), "reg": (0.01, 0.1, 1.0, 10.0, 100.0)},
    "linear": {"alpha": (0.01, 0.1, 1.0, 10.0, 40.0), "reg": (0.01, 0.1, 1.0, 10.0, 100.0)},
}
QUICK_SWEEP = {
    "log": {"alpha": (1.0, 10.0), "reg": (0.1, 10.0)},
    "linear": {"alpha": (0.1, 1.0), "reg": (1.0, 100.0)},
}


def split(ds: Dataset, seed: int) -> tuple:
    """(train, test): latest 20% per user when the data has timestamps, else random with `seed`."""
    if ds.timestamps is not None:
        train, test = holdout_split(ds.plays, 0.2, seed=seed, timestamps=ds.timestamps)
        # timestamps of the training part, aligned with it, for the validation split
        ts = ds.timestamps.multiply(train > 0).tocsr()
        ts.sort_indices()
        return train, test, ts
    train, test = holdout_split(ds.plays, 0.2, seed=seed)
    return train, test, None


def fit(train, params: AlsParams, start: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    res = train_als(
        train, params, user_factors=start[0], item_factors=start[1], compute_loss=False, show_progress=False
    )
    return res.user_factors, res.item_factors


def starts(shape: tuple[int, int], params: AlsParams) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(params.seed)
    return initial_factors(shape[0], params.factors, rng), initial_factors(shape[1], params.factors, rng)


def metric_cells(m: Metrics) -> list[str]:
    return [f"{m.precision:.4f}", f"{m.recall:.4f}", f"{m.ndcg:.4f}", f"{100 * m.mpr:.2f}%"]


def comparison(ds: Dataset, train, test, args: argparse.Namespace) -> list[list[str]]:
    rows = []
    settings = [
        AlsParams(args.factors, args.iterations, args.alpha, args.reg, args.confidence, seed=args.seed),
        AlsParams(args.factors, args.iterations, 1.0, 1.0, "linear", seed=args.seed),
    ]
    for params in settings:
        label = f"{params.confidence} a={params.alpha:g} reg={params.reg:g}"
        start = starts(train.shape, params)
        t = time.perf_counter()
        X, Y = fit(train, params, start)
        tp = time.perf_counter() - t
        mp = ranking_metrics(X, Y, train, test, k=10)
        cm1 = confidence_matrix(train, params.alpha, params.confidence, params.eps)
        with blas_single_thread():
            t = time.perf_counter()
            Xi, Yi, _ = implicit_als(implicit_confidence(cm1), *start, params.factors, params.iterations, params.reg)
            ti = time.perf_counter() - t
        mi = ranking_metrics(Xi, Yi, train, test, k=10)
        rows.append([ds.name, "playrec", label, *metric_cells(mp), f"{tp:.2f}"])
        rows.append([ds.name, "implicit", label, *metric_cells(mi), f"{ti:.2f}"])
        print(f"{ds.name} {label}: playrec {mp.describe()}\n{' ' * len(ds.name)} {label}: implicit {mi.describe()}")
    mpop = ranking_metrics(*popularity_factors(train), train, test, k=10)
    rows.append([ds.name, "popularity", "-", *metric_cells(mpop), "-"])
    print(f"{ds.name} popularity: {mpop.describe()}")
    return rows


def sweep(ds: Dataset, train, train_ts, test, grid: dict, args: argparse.Namespace) -> list[dict]:
    """Every setting: validation NDCG (fit on train minus validation) and test metrics (fit on train)."""
    if train_ts is not None:
        fit_part, val = holdout_split(train, 0.2, seed=args.seed + 1, timestamps=train_ts)
    else:
        fit_part, val = holdout_split(train, 0.2, seed=args.seed + 1)
    out = []
    for kind, g in grid.items():
        for alpha, reg in itertools.product(g["alpha"], g["reg"]):
            params = AlsParams(args.factors, args.iterations, alpha, reg, kind, seed=args.seed)
            mv = ranking_metrics(*fit(fit_part, params, starts(train.shape, params)), fit_part, val, k=10)
            mt = ranking_metrics(*fit(train, params, starts(train.shape, params)), train, test, k=10)
            out.append({"kind": kind, "alpha": alpha, "reg": reg, "val": mv, "test": mt})
            print(
                f"{ds.name} {kind:6s} alpha {alpha:<5g} reg {reg:<6g} val NDCG@10 {mv.ndcg:.4f} | test {mt.describe()}",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated from {', '.join(DATASETS)}")
    ap.add_argument("--factors", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--reg", type=float, default=0.1)
    ap.add_argument("--confidence", choices=("log", "linear"), default="log")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a 2 x 2 sweep per confidence kind")
    ap.add_argument(
        "--grid",
        help="sweep grid as 'kind:alphas:regs;...', e.g. 'log:2,5,10:20,50,100;linear:0.01,0.1:1,10'",
    )
    ap.add_argument("--no-comparison", action="store_true", help="only the sweep")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    grid = parse_grid(args.grid) if args.grid else QUICK_SWEEP if args.quick else SWEEP
    print(f"# ALS ranking quality\n\n{machine_notes()}\nfactors {args.factors}, iterations {args.iterations}\n")
    comp_rows: list[list[str]] = []
    sweeps: dict[str, list[dict]] = {}
    for name in names:
        ds = load_dataset(name)
        train, test, train_ts = split(ds, args.seed)
        print(f"## {ds.describe()}: train {train.nnz:,}, test {test.nnz:,}")
        if not args.no_comparison:
            comp_rows += comparison(ds, train, test, args)
        if not args.no_sweep:
            sweeps[ds.name] = sweep(ds, train, train_ts, test, grid, args)
    if comp_rows:
        print("\n### Comparison (test split)\n")
        header = ["data set", "model", "confidence", "P@10", "R@10", "NDCG@10", "MPR", "fit s"]
        print(markdown_table(header, comp_rows))
    if sweeps:
        print_sweep(sweeps)
    return 0


def parse_grid(text: str) -> dict:
    grid = {}
    for part in text.split(";"):
        kind, alphas, regs = part.strip().split(":")
        if kind not in ("log", "linear"):
            raise SystemExit(f"--grid: unknown confidence {kind!r}")
        grid[kind] = {
            "alpha": tuple(float(a) for a in alphas.split(",")),
            "reg": tuple(float(r) for r in regs.split(",")),
        }
    return grid


def print_sweep(sweeps: dict[str, list[dict]]) -> None:
    names = list(sweeps)
    print("\n### Sweep (playrec): validation NDCG@10, test P@10 / NDCG@10 / MPR\n")
    keys = [(r["kind"], r["alpha"], r["reg"]) for r in sweeps[names[0]]]
    by = {n: {(r["kind"], r["alpha"], r["reg"]): r for r in rs} for n, rs in sweeps.items()}
    rows = []
    for key in keys:
        line = [key[0], f"{key[1]:g}", f"{key[2]:g}"]
        for n in names:
            r = by[n].get(key)
            if r is None:
                line += ["-", "-"]
                continue
            t = r["test"]
            line += [f"{r['val'].ndcg:.4f}", f"{t.precision:.4f} / {t.ndcg:.4f} / {100 * t.mpr:.2f}%"]
        rows.append(line)
    header = ["confidence", "alpha", "reg"]
    for n in names:
        header += [f"{n} val NDCG", f"{n} test P / NDCG / MPR"]
    print(markdown_table(header, rows))
    # selection on validation: best per data set and kind, and the best compromise (mean of each
    # data set's validation NDCG relative to its best)
    print("\n### Selected on validation NDCG@10\n")
    sel = []
    for n in names:
        for kind in ("log", "linear"):
            cands = [r for r in sweeps[n] if r["kind"] == kind]
            if cands:
                b = max(cands, key=lambda r: r["val"].ndcg)
                t = b["test"]
                sel.append([n, kind, f"{b['alpha']:g}", f"{b['reg']:g}", f"{b['val'].ndcg:.4f}", *metric_cells(t)])
    print(markdown_table(["data set", "confidence", "alpha", "reg", "val NDCG", "P@10", "R@10", "NDCG@10", "MPR"], sel))
    if len(names) > 1:
        best = {n: max(r["val"].ndcg for r in sweeps[n]) for n in names}
        scores = {k: float(np.mean([by[n][k]["val"].ndcg / best[n] for n in names])) for k in keys}
        ranked = sorted(keys, key=lambda k: -scores[k])[:5]
        print("\nBest compromise across data sets (mean validation NDCG@10 relative to each data set's best):\n")
        rows = []
        for k in ranked:
            line = [k[0], f"{k[1]:g}", f"{k[2]:g}", f"{scores[k]:.3f}"]
            line += [f"{by[n][k]['test'].ndcg:.4f}" for n in names]
            rows.append(line)
        header = ["confidence", "alpha", "reg", "mean rel. val NDCG", *[f"{n} test NDCG" for n in names]]
        print(markdown_table(header, rows))


if __name__ == "__main__":
    raise SystemExit(main())
