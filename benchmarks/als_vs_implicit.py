"""playrec's ALS against implicit 0.7's CPU ALS: speed, final Hu loss, agreement and memory.

Both get the same data, factors, iterations, regularisation, confidence and the SAME initial factors.
implicit is given the confidence matrix `c = 1 + (c - 1)` itself (it subtracts 1 internally) with its
own alpha = 1, CG with 3 steps, no training loss. BLAS is limited to one thread (threadpoolctl) for
both, as implicit's docs ask; each uses all cores by its own threading (implicit: OpenMP; playrec: a
thread pool over chunks of rows).

The two libraries alternate within each repeat (the order flips every repeat) so that load on the
machine hits both alike. Seconds per iteration: the median over all iterations of all repeats
(playrec: `AlsResult.seconds`; implicit: the elapsed time its fit callback reports; neither includes
the confidence matrix or its transpose). Loss: `batch.als.hu_loss` (over all user x item pairs,
unnormalised) on both final factor sets. Memory: tracemalloc's peak of the numpy/scipy arrays that
`train_als` allocates beyond those alive when it starts (BLAS/OpenMP workspaces and the interpreter
are not counted), relative to the bytes of the factor and play-count arrays.

    .venv/bin/python benchmarks/als_vs_implicit.py                   # all three data sets
    .venv/bin/python benchmarks/als_vs_implicit.py --quick           # a fast smoke run
    .venv/bin/python benchmarks/als_vs_implicit.py --datasets lastfm --iterations 15 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    blas_single_thread,
    csr_bytes,
    implicit_als,
    implicit_confidence,
    load_dataset,
    machine_notes,
    markdown_table,
    traced_peak,
)

from batch.als import AlsParams, hu_loss, initial_factors, loss_normaliser, train_als
from batch.confidence import confidence_matrix
from batch.solvers import half_step

DATASETS = ("lastfm", "synth-200k", "synth-50k")


def relative(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Frobenius relative difference, 99th percentile of the per-row relative differences)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    total = float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))
    norms = np.linalg.norm(b64, axis=1)
    rows = np.linalg.norm(a64 - b64, axis=1)[norms > 0] / norms[norms > 0]
    return total, float(np.percentile(rows, 99)) if rows.size else 0.0


def cpu_times(cm1, X0: np.ndarray, Y0: np.ndarray, reg: float, repeats: int, baseline: str | None) -> dict:
    """Single-thread CPU seconds (time.thread_time) of one user and one item half-step, medians.

    Robust to load from other processes (it counts only this thread's CPU time): playrec with
    n_threads=1, implicit's CG kernel with num_threads=1 (its OpenMP then runs in this thread), and
    optionally a baseline copy of batch/solvers.py (e.g. `git show HEAD:batch/solvers.py > /tmp/s.py`).
    All start from the same factors after one implicit iteration (a warm start, as in training).
    """
    from implicit.cpu import _als

    conf = implicit_confidence(cm1)
    conf_t = conf.T.tocsr()
    cm1_t = cm1.T.tocsr()
    cm1_t.sort_indices()
    X, Y = X0.copy(), Y0.copy()
    _als.least_squares_cg(conf, X, Y, reg, num_threads=0, cg_steps=3)
    _als.least_squares_cg(conf_t, Y, X, reg, num_threads=0, cg_steps=3)
    solvers = {"playrec": half_step}
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_solvers", baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        solvers["baseline"] = module.half_step
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in [*solvers, "implicit"]}
    for _ in range(repeats):
        for name, fn in solvers.items():
            t = time.thread_time()
            fn(cm1, Y, X, reg, "cg", 3, 1)
            tu = time.thread_time() - t
            t = time.thread_time()
            fn(cm1_t, X, Y, reg, "cg", 3, 1)
            times[name].append((tu, time.thread_time() - t))
        Xi, Yi = X.copy(), Y.copy()
        t = time.thread_time()
        _als.least_squares_cg(conf, Xi, Y, reg, num_threads=1, cg_steps=3)
        tu = time.thread_time() - t
        t = time.thread_time()
        _als.least_squares_cg(conf_t, Yi, X, reg, num_threads=1, cg_steps=3)
        times["implicit"].append((tu, time.thread_time() - t))
    return {
        name: (float(np.median([a for a, _ in v])), float(np.median([b for _, b in v]))) for name, v in times.items()
    }


def compare(name: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    ds = load_dataset(name, seed=args.seed)
    print(f"\n## {ds.describe()} (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
    plays = ds.plays
    params = AlsParams(
        factors=args.factors,
        iterations=args.iterations,
        alpha=args.alpha,
        reg=args.reg,
        confidence=args.confidence,
        eps=args.eps,
        cg_steps=3,
        seed=args.seed,
    )
    rng = np.random.default_rng(args.seed)
    X0 = initial_factors(plays.shape[0], args.factors, rng)
    Y0 = initial_factors(plays.shape[1], args.factors, rng)
    cm1 = confidence_matrix(plays, params.alpha, params.confidence, params.eps)
    conf = implicit_confidence(cm1)
    row = {"name": ds.name, "shape": f"{plays.shape[0]:,} x {plays.shape[1]:,}", "nnz": plays.nnz}

    with blas_single_thread():
        # agreement: one iteration (user then item half-step) from identical starts
        Xi, Yi, _ = implicit_als(conf, X0, Y0, args.factors, 1, params.reg, num_threads=args.threads or 0)
        cm1_t = cm1.T.tocsr()
        cm1_t.sort_indices()
        Xp = half_step(cm1, Y0, X0, params.reg, "cg", 3, args.threads)
        Yp = half_step(cm1_t, Xp, Y0, params.reg, "cg", 3, args.threads)
        row["agree_x"], row["agree_x99"] = relative(Xp, Xi)
        row["agree_y"], row["agree_y99"] = relative(Yp, Yi)
        print(
            f"after 1 iteration from the same start: |X_p - X_i|/|X_i| = {row['agree_x']:.2e} "
            f"(99th pct row {row['agree_x99']:.2e}), |Y_p - Y_i|/|Y_i| = {row['agree_y']:.2e} "
            f"(99th pct row {row['agree_y99']:.2e})",
            flush=True,
        )
        del cm1_t, Xp, Yp, Xi, Yi
        if args.cpu_time:
            row["cpu"] = cpu_times(cm1, X0, Y0, params.reg, max(3, args.repeats), args.baseline)
            print(
                "single-thread CPU s per half-step (user, item): "
                + ", ".join(f"{k} {u:.3f} + {i:.3f}" for k, (u, i) in row["cpu"].items()),
                flush=True,
            )

        secs: dict[str, list[float]] = {"playrec": [], "implicit": []}
        final: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for rep in range(args.repeats):
            order = ("playrec", "implicit") if rep % 2 == 0 else ("implicit", "playrec")
            for lib in order:
                if lib == "playrec":
                    res = train_als(
                        plays,
                        params,
                        user_factors=X0,
                        item_factors=Y0,
                        compute_loss=False,
                        show_progress=False,
                        n_threads=args.threads,
                    )
                    secs[lib] += res.seconds
                    final[lib] = (res.user_factors, res.item_factors)
                else:
                    X, Y, s = implicit_als(
                        conf, X0, Y0, args.factors, args.iterations, params.reg, num_threads=args.threads or 0
                    )
                    secs[lib] += s
                    final[lib] = (X, Y)
            print(
                f"repeat {rep + 1}: playrec {np.median(secs['playrec'][-args.iterations :]):.3f} s/it, "
                f"implicit {np.median(secs['implicit'][-args.iterations :]):.3f} s/it",
                flush=True,
            )
        norm = loss_normaliser(cm1)
        for lib in ("playrec", "implicit"):
            row[f"{lib}_s"] = float(np.median(secs[lib]))
            row[f"{lib}_loss"] = hu_loss(cm1, *final[lib], params.reg)
            print(f"{lib}: final Hu loss {row[f'{lib}_loss']:.6g} (normalised {row[f'{lib}_loss'] / norm:.6f})")

        if not args.no_memory:
            base = X0.nbytes + Y0.nbytes + csr_bytes(plays)
            mem_params = AlsParams(**{**params.to_dict(), "iterations": min(2, args.iterations)})
            for loss in (False, True):
                _, peak = traced_peak(
                    lambda loss=loss: train_als(
                        plays,
                        mem_params,
                        user_factors=X0,
                        item_factors=Y0,
                        compute_loss=loss,
                        show_progress=False,
                        n_threads=args.threads,
                    )
                )
                row[f"mem_{'loss' if loss else 'noloss'}"] = peak / base
            _, peak = traced_peak(
                lambda: implicit_als(
                    conf, X0, Y0, args.factors, mem_params.iterations, params.reg, num_threads=args.threads or 0
                )
            )
            row["mem_implicit"] = peak / base
            row["mem_base_mb"] = base / 2**20
            print(
                f"peak extra memory (tracemalloc) / (factors + plays = {base / 2**20:.1f} MiB): playrec "
                f"{row['mem_noloss']:.2f}x without loss, {row['mem_loss']:.2f}x with the per-iteration loss; "
                f"implicit {row['mem_implicit']:.2f}x"
            )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--datasets", help=f"comma-separated from {', '.join(DATASETS)} (default: all)")
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--quick", action="store_true", help="5 iterations, 1 repeat, and lastfm,synth-50k unless --datasets"
    )
    ap.add_argument("--factors", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--reg", type=float, default=0.1)
    ap.add_argument("--confidence", choices=("log", "linear"), default="log")
    ap.add_argument("--eps", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="threads for BOTH libraries (default: all CPUs)")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="also time one user + one item half-step in single-thread CPU seconds (robust to machine load)",
    )
    ap.add_argument("--baseline", help="with --cpu-time: a copy of batch/solvers.py to time as well")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.repeats = 5, 1
        args.datasets = args.datasets or "lastfm,synth-50k"
    args.datasets = args.datasets or ",".join(DATASETS)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    print(f"# playrec vs implicit ALS\n\n{machine_notes()}")
    print(
        f"factors {args.factors}, iterations {args.iterations}, repeats {args.repeats}, alpha {args.alpha}, "
        f"reg {args.reg}, confidence {args.confidence} (eps {args.eps}), CG 3 steps, seed {args.seed}, "
        f"threads {args.threads or 'all CPUs'} for both"
    )
    rows = [compare(n, args) for n in names]
    header = [
        "data set",
        "users x items",
        "nnz",
        "playrec s/it",
        "implicit s/it",
        "speed (implicit / playrec)",
        "Hu loss playrec",
        "Hu loss implicit",
        "loss ratio",
        "1-it agreement X / Y",
    ]
    if not args.no_memory:
        header += ["peak extra mem / (F + R)", "implicit peak extra / (F + R)"]
    table = []
    for r in rows:
        line = [
            r["name"],
            r["shape"],
            f"{r['nnz']:,}",
            f"{r['playrec_s']:.3f}",
            f"{r['implicit_s']:.3f}",
            f"{r['implicit_s'] / r['playrec_s']:.2f}x",
            f"{r['playrec_loss']:.6g}",
            f"{r['implicit_loss']:.6g}",
            f"{r['playrec_loss'] / r['implicit_loss']:.6f}",
            f"{r['agree_x']:.1e} / {r['agree_y']:.1e}",
        ]
        if not args.no_memory:
            line += [
                f"{r['mem_noloss']:.2f}x ({r['mem_loss']:.2f}x with loss; F + R = {r['mem_base_mb']:.0f} MiB)",
                f"{r['mem_implicit']:.2f}x",
            ]
        table.append(line)
    print("\n" + markdown_table(header, table))
    if args.cpu_time:
        names_cpu = list(rows[0]["cpu"])
        cpu_rows = []
        for r in rows:
            line = [r["name"]]
            for name in names_cpu:
                u, i = r["cpu"][name]
                line.append(f"{u:.3f} + {i:.3f} = {u + i:.3f}")
            imp = sum(r["cpu"]["implicit"])
            line.append(f"{imp / sum(r['cpu']['playrec']):.2f}x")
            if "baseline" in r["cpu"]:
                line.append(f"{sum(r['cpu']['baseline']) / sum(r['cpu']['playrec']):.2f}x")
            cpu_rows.append(line)
        cpu_header = ["data set", *[f"{n} CPU s (user + item)" for n in names_cpu], "implicit / playrec"]
        if "baseline" in names_cpu:
            cpu_header.append("baseline / playrec")
        print("\nSingle-thread CPU seconds per iteration (thread_time, median):\n")
        print(markdown_table(cpu_header, cpu_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
