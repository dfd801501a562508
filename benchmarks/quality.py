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

3. Baselines (`--baselines`, issue #16): per data set (benchmarks/tuning.py's six, `--datasets` picks),
   test P@10 / NDCG@10 / MPR and seconds of popularity; implicit's CPU ALS (CG, 40 factors, 15
   iterations, one BLAS thread) over an alpha x reg grid for linear and log (eps 1) confidence, widened
   until the chosen points are interior, both the best on TEST P@10 (the ceiling) and the point
   validation NDCG@10 on a split of the training part chooses; EASE (lambda on validation, <= 20K
   tracks); playrec's defaults (20 and 15 iterations) and `playrec train --tune`'s path; and ratios.

    .venv/bin/python benchmarks/quality.py --baselines
    .venv/bin/python benchmarks/quality.py --baselines --datasets synthetic --no-ease
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import time
from dataclasses import dataclass, replace
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
from batch.training import tune_on_training_part
from batch.tuning import TuneSettings

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
    ap.add_argument(
        "--datasets",
        help=f"comma-separated from {', '.join(DATASETS)} (default both); --baselines: benchmarks/tuning.py's",
    )
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
    ap.add_argument("--baselines", action="store_true", help="popularity, implicit best-of-grid, EASE, playrec")
    ap.add_argument("--no-ease", action="store_true", help="--baselines without EASE")
    ap.add_argument("--playrec-only", action="store_true", help="--baselines: popularity and playrec's rows only")
    ap.add_argument("--refine", action="store_true", help="--baselines: refine implicit's grid at half the step")
    args = ap.parse_args(argv)
    if args.baselines:
        from tuning import DATASETS as BASELINE_DATASETS

        chosen = args.datasets or ",".join(BASELINE_DATASETS)
        return baselines_main([n.strip() for n in chosen.split(",") if n.strip()], args)
    names = [n.strip() for n in (args.datasets or ",".join(DATASETS)).split(",") if n.strip()]
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


@dataclass(frozen=True)
class Lattice:
    """A geometric alpha x reg grid: alpha = alpha0 * alpha_ratio**i, reg = reg0 * reg_ratio**j, the base
    grid i < n_alpha, j < n_reg; widening adds integer steps beyond it (3 significant digits)."""

    alpha0: float
    alpha_ratio: float
    n_alpha: int
    reg0: float
    reg_ratio: float
    n_reg: int

    def alpha(self, i: int) -> float:
        return float(f"{self.alpha0 * self.alpha_ratio**i:.3g}")

    def reg(self, j: int) -> float:
        return float(f"{self.reg0 * self.reg_ratio**j:.3g}")

    def base(self) -> list[tuple[int, int]]:
        return list(itertools.product(range(self.n_alpha), range(self.n_reg)))

    def halved(self) -> Lattice:
        """The same grid at half the step (index 2i here is index i of self)."""
        return Lattice(
            self.alpha0, self.alpha_ratio**0.5, 2 * self.n_alpha - 1, self.reg0, self.reg_ratio**0.5, 2 * self.n_reg - 1
        )


#: implicit's grids: log alpha 0.5..16 (x2), linear alpha 0.001..1 (x sqrt 10), reg 1..316 (x sqrt 10).
BASELINE_GRID = {
    "log": Lattice(0.5, 2.0, 6, 1.0, 10**0.5, 6),
    "linear": Lattice(0.001, 10**0.5, 7, 1.0, 10**0.5, 6),
}


@dataclass
class GridPoint:
    """One implicit setting: validation metrics (fit on the fit part) and test metrics (fit on train)."""

    kind: str
    key: tuple[int, int]
    alpha: float
    reg: float
    val: Metrics
    test: Metrics
    val_seconds: float


def implicit_fit(
    plays, kind: str, alpha: float, reg: float, start: tuple[np.ndarray, np.ndarray], factors: int, iterations: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """implicit's CPU ALS (CG) on the confidence `1 + (c - 1)` of `plays`, one BLAS thread: (X, Y, fit seconds)."""
    conf = implicit_confidence(confidence_matrix(plays, alpha, kind, 1.0))  # type: ignore[arg-type]
    with blas_single_thread():
        t = time.perf_counter()
        X, Y, _ = implicit_als(conf, *start, factors, iterations, reg)
        return X, Y, time.perf_counter() - t


def implicit_grid(
    kind: str,
    lattice: Lattice,
    splits: dict,
    start: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
    max_rounds: int = 6,
    refine: bool = False,
) -> tuple[dict[tuple[int, int], GridPoint], list[tuple[int, int]], Lattice]:
    """Evaluate the base grid, then widen around the best-on-test and best-on-validation points until all
    their 8 lattice neighbours are evaluated (or `max_rounds`); with `refine`, repeat that at half the step
    (`Lattice.halved`, at most 3 rounds). Returns (points, keys added after the base grid, the lattice the
    keys index)."""
    points: dict[tuple[int, int], GridPoint] = {}
    added: list[tuple[int, int]] = []
    current = [lattice]

    def evaluate(key: tuple[int, int]) -> None:
        alpha, reg = current[0].alpha(key[0]), current[0].reg(key[1])
        t = time.perf_counter()
        Xv, Yv, _ = implicit_fit(splits["fit"], kind, alpha, reg, start, args.factors, args.iterations)
        mv = ranking_metrics(Xv, Yv, splits["fit"], splits["val"], 10, percentile_ranks=False)
        val_s = time.perf_counter() - t
        Xt, Yt, _ = implicit_fit(splits["train"], kind, alpha, reg, start, args.factors, args.iterations)
        mt = ranking_metrics(Xt, Yt, splits["train"], splits["test"], 10, percentile_ranks=False)
        points[key] = GridPoint(kind, key, alpha, reg, mv, mt, val_s)
        print(
            f"  implicit {kind:6s} alpha {alpha:<7g} reg {reg:<6g} val NDCG {mv.ndcg:.4f} P {mv.precision:.4f}"
            f" | test P {mt.precision:.4f} NDCG {mt.ndcg:.4f}",
            flush=True,
        )

    def widen(rounds: int) -> None:
        for _ in range(rounds):
            missing = {
                (i + di, j + dj)
                for i, j in (best_on_test(points).key, best_on_validation(points).key)
                for di in (-1, 0, 1)
                for dj in (-1, 0, 1)
            } - set(points)
            if not missing:
                break
            for key in sorted(missing):
                evaluate(key)
                added.append(key)

    for key in lattice.base():
        evaluate(key)
    widen(max_rounds)
    if refine:
        current[0] = lattice.halved()
        points = {(2 * i, 2 * j): replace(p, key=(2 * i, 2 * j)) for (i, j), p in points.items()}
        added = [(2 * i, 2 * j) for i, j in added]
        widen(3)
    return points, added, current[0]


def best_on_test(points: dict) -> GridPoint:
    return max(points.values(), key=lambda p: (p.test.precision, p.test.ndcg))


def best_on_validation(points: dict) -> GridPoint:
    return max(points.values(), key=lambda p: (p.val.ndcg, p.val.precision))


def base_grid_note(p: GridPoint, lattice: Lattice) -> str:
    """' (outside the base grid)', ' (base-grid edge)' or '' for interior points of `lattice`'s base grid."""
    a_lo, a_hi = lattice.alpha(0), lattice.alpha(lattice.n_alpha - 1)
    r_lo, r_hi = lattice.reg(0), lattice.reg(lattice.n_reg - 1)
    if not (a_lo <= p.alpha <= a_hi and r_lo <= p.reg <= r_hi):
        return " (outside the base grid)"
    return "" if a_lo < p.alpha < a_hi and r_lo < p.reg < r_hi else " (base-grid edge)"


def grid_text(kind: str, points: dict, lattice: Lattice) -> str:
    """Test P@10 of every evaluated point (alpha rows x reg columns); * best on test, v chosen on validation."""
    t, v = best_on_test(points).key, best_on_validation(points).key
    alphas = sorted({k[0] for k in points})
    regs = sorted({k[1] for k in points})
    rows = []
    for i in alphas:
        line = [f"{lattice.alpha(i):g}"]
        for j in regs:
            p = points.get((i, j))
            mark = ("*" if (i, j) == t else "") + ("v" if (i, j) == v else "")
            line.append("" if p is None else f"{p.test.precision:.4f}{mark}")
        rows.append(line)
    return markdown_table([f"{kind} alpha \\ reg", *[f"{lattice.reg(j):g}" for j in regs]], rows)


_EASE_CACHE: dict[str, tuple[Metrics, float, float]] = {}


def ease_row(train, test, train_ts) -> tuple[Metrics, float, float]:
    """tuning.ease_metrics, memoised on the binarised training pattern (Last.fm, x10 and binary share it)."""
    from tuning import ease_metrics

    h = hashlib.sha1(train.indptr.tobytes() + train.indices.tobytes() + test.indices.tobytes())
    if train_ts is not None:
        h.update(train_ts.data.tobytes())
    key = h.hexdigest()
    if key not in _EASE_CACHE:
        t = time.perf_counter()
        m, lam = ease_metrics(train, test, train_ts)
        _EASE_CACHE[key] = (m, lam, time.perf_counter() - t)
    return _EASE_CACHE[key]


def baselines(name: str, args: argparse.Namespace) -> tuple[list[list[str]], dict[str, Metrics]]:
    """One data set's baseline table rows and the metrics the ratios use."""
    from tuning import load

    counts = load(name)
    ds = Dataset(name, counts.matrix.astype(np.float32), counts.last_played)
    train, test, train_ts = split(ds, 0)
    fit_part, val = holdout_split(train, 0.2, seed=1, timestamps=train_ts)  # the tuner's validation split
    splits = {"train": train, "test": test, "fit": fit_part, "val": val}
    print(f"\n## {ds.describe()}: train {train.nnz:,}, test {test.nnz:,}, validation {val.nnz:,}", flush=True)
    rows: list[list[str]] = []
    got: dict[str, Metrics] = {}

    def row(model: str, setting: str, m: Metrics, fit_s: float | None, select_s: str = "-") -> None:
        fs = "-" if fit_s is None else f"{fit_s:.2f}"
        rows.append([model, setting, f"{m.precision:.4f}", f"{m.ndcg:.4f}", f"{100 * m.mpr:.2f}%", fs, select_s])
        print(f"  -> {model} ({setting}): {m.describe()}", flush=True)

    t = time.perf_counter()
    pop = popularity_factors(train)
    pop_s = time.perf_counter() - t
    row("popularity", "listeners", ranking_metrics(*pop, train, test, 10), pop_s)
    start = starts(train.shape, AlsParams(args.factors, args.iterations, seed=0))
    best_implicit = None
    for kind, lattice in {} if args.playrec_only else BASELINE_GRID.items():
        points, added, fine = implicit_grid(kind, lattice, splits, start, args, refine=args.refine)
        grid_s = sum(p.val_seconds for p in points.values())  # the validation fits and rankings only
        print("\n" + grid_text(kind, points, fine) + "\n", flush=True)
        chosen = (("best on test P@10", best_on_test(points)), ("chosen on validation", best_on_validation(points)))
        for label, p in chosen:
            X, Y, fit_s = implicit_fit(train, kind, p.alpha, p.reg, start, args.factors, args.iterations)
            m = ranking_metrics(X, Y, train, test, 10)
            edge = base_grid_note(p, lattice)
            sel = f"{grid_s:.0f} (grid of {len(points)})" if label.startswith("chosen") else "-"
            row(f"implicit {kind}, {label}", f"a={p.alpha:g} reg={p.reg:g}{edge}", m, fit_s, sel)
            if label.startswith("best") and (best_implicit is None or m.precision > best_implicit.precision):
                best_implicit = m
            if label.startswith("chosen"):
                got[f"implicit {kind} val"] = m
        extra = ", ".join(f"{fine.alpha(i):g}/{fine.reg(j):g}" for i, j in added)
        print(f"  {kind}: {len(points)} points, {len(added)} added by widening (alpha/reg): {extra}", flush=True)
    if best_implicit is not None:
        got["implicit best"] = best_implicit
    if not (args.no_ease or args.playrec_only) and train.shape[1] <= 20_000:
        m, lam, ease_s = ease_row(train, test, train_ts)
        row("EASE", f"lambda={lam:g} (validation)", m, None, f"{ease_s:.0f} (5+ inverses)")
        got["EASE"] = m
    for iters in (20, 15):
        params = replace(AlsParams(), iterations=iters)
        t = time.perf_counter()
        X, Y = fit(train, params, starts(train.shape, params))
        fit_s = time.perf_counter() - t
        m = ranking_metrics(X, Y, train, test, 10)
        row(f"playrec defaults, {iters} it", f"{params.confidence} a={params.alpha:g} reg={params.reg:g}", m, fit_s)
        got[f"defaults {iters}"] = m
    tuned = tune_on_training_part(counts, AlsParams(), TuneSettings(), 0.2, show_progress=False)
    c = tuned.choice
    t = time.perf_counter()
    X, Y = fit(train, c, starts(train.shape, c))
    fit_s = time.perf_counter() - t
    m = ranking_metrics(X, Y, train, test, 10)
    setting = f"{c.confidence} a={c.alpha:g} reg={c.reg:g}"
    if getattr(c, "reg_exp", 0):  # frequency-scaled reg, where batch.tuning searches it
        setting += f" reg_exp={c.reg_exp:g}"
    row("playrec --tune, 20 it", setting, m, fit_s, f"{tuned.seconds:.0f} (tuner)")
    got["tuned"] = m
    if name == "synthetic":
        from _common import factor_synthetic

        oracle = ranking_metrics(*factor_synthetic().oracle_factors(), train, test, 10)
        row("oracle (true factors)", "log popularity + u.v", oracle, None)
    return rows, got


def ratio_lines(got: dict[str, Metrics]) -> list[str]:
    """'a / b: P@10 x, NDCG@10 y' for the issue's comparisons."""
    pairs = [
        ("playrec defaults (20 it) / implicit best", "defaults 20", "implicit best"),
        ("playrec defaults (15 it) / implicit best", "defaults 15", "implicit best"),
        ("playrec --tune / implicit best", "tuned", "implicit best"),
        ("playrec --tune / implicit log chosen on validation", "tuned", "implicit log val"),
        ("playrec --tune / implicit linear chosen on validation", "tuned", "implicit linear val"),
        ("playrec --tune / EASE", "tuned", "EASE"),
        ("playrec defaults (20 it) / EASE", "defaults 20", "EASE"),
    ]
    out = []
    for label, a, b in pairs:
        if a in got and b in got:
            pa, pb = got[a], got[b]
            out.append(f"{label}: P@10 {pa.precision / pb.precision:.3f}x, NDCG@10 {pa.ndcg / pb.ndcg:.3f}x")
    return out


def baselines_main(names: list[str], args: argparse.Namespace) -> int:
    print(f"# Baselines: implicit best-of-grid, EASE, popularity\n\n{machine_notes()}")
    print(f"implicit: {args.factors} factors, {args.iterations} iterations, CG 3 steps, one BLAS thread; grids:")
    for kind, lat in BASELINE_GRID.items():
        alphas = ", ".join(f"{lat.alpha(i):g}" for i in range(lat.n_alpha))
        regs = ", ".join(f"{lat.reg(j):g}" for j in range(lat.n_reg))
        how = "widened, then refined at half the step," if args.refine else "widened"
        print(f"  {kind}: alpha {{{alphas}}} x reg {{{regs}}}, {how} around the chosen points")
    header = ["model", "setting", "P@10", "NDCG@10", "MPR", "fit s", "selection s"]
    done = []
    for name in names:
        t = time.perf_counter()
        rows, got = baselines(name, args)
        table = markdown_table(header, rows)
        lines = ratio_lines(got)
        done.append((name, table, lines))
        print(f"\n### {name} ({time.perf_counter() - t:.0f} s)\n\n{table}\n")
        print("\n".join(f"- {line}" for line in lines), flush=True)
    print("\n# All data sets\n")
    for name, table, lines in done:
        print(f"### {name}\n\n{table}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
