"""Scale benchmark: the full batch retrain (`batch.training.train_and_publish`) on synthetic data.

For each size (users x tracks x plays) a fresh subprocess generates seeded power-law play counts
(`benchmarks/_common.py:synthetic_plays`) and runs the retrain exactly as `playrec train` does:
ALS training (with the per-iteration loss), both forests (dot and cosine), the play-count arrays and
publishing with fsync and sha256 checksums into a temporary model store. It reports wall and CPU
seconds per phase (generate, evaluate if holdout > 0, train, index, publish) and peak RSS: per phase
(Linux VmHWM, reset at every phase boundary through /proc/self/clear_refs) and for the whole
process (`getrusage(RUSAGE_SELF).ru_maxrss`).

    .venv/bin/python benchmarks/scale.py --sizes 1Mx200Kx1M,1Mx200Kx5M,1Mx200Kx20M,1Mx200Kx50M \
        --results /tmp/scale.jsonl
    .venv/bin/python benchmarks/scale.py --sizes 1Mx200Kx1M,1Mx200Kx5M --holdout 0.2 --results /tmp/scale.jsonl
    .venv/bin/python benchmarks/scale.py --report /tmp/scale.jsonl --plot docs/img/scale_time_memory.png

Every finished size is appended to `--results` (one JSON object a line) as soon as it ends, so a long
run in the background leaves what it finished. `--report` prints the tables, the fitted per-iteration
cost model and the extrapolation from a results file (and draws the plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, machine_notes, markdown_table, synthetic_plays

SUFFIX = {"K": 1_000, "M": 1_000_000, "B": 1_000_000_000}
DEFAULT_SIZES = "1Mx200Kx1M,1Mx200Kx5M,1Mx200Kx20M,1Mx200Kx50M"


def parse_count(text: str) -> int:
    text = text.strip().upper()
    if text and text[-1] in SUFFIX:
        return int(float(text[:-1]) * SUFFIX[text[-1]])
    return int(text)


def parse_size(spec: str) -> tuple[int, int, int]:
    parts = spec.lower().split("x")
    if len(parts) != 3:
        raise SystemExit(f"size {spec!r}: expected USERSxTRACKSxPLAYS, e.g. 1Mx200Kx50M")
    users, tracks, plays = (parse_count(p) for p in parts)
    return users, tracks, plays


def fmt_count(n: float) -> str:
    for unit, value in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= value:
            return f"{n / value:g}{unit}"
    return f"{n:g}"


# ----------------------------------------------------------------------------------------------- child


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _malloc_trim() -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class Phases:
    """Wall/CPU time and peak RSS (VmHWM, reset at each boundary) between consecutive marks."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._reset_hwm()
        self._t, self._cpu = time.perf_counter(), time.process_time()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def mark(self, name: str) -> None:
        t, cpu = time.perf_counter(), time.process_time()
        self.rows.append(
            {
                "phase": name,
                "wall_s": t - self._t,
                "cpu_s": cpu - self._cpu,
                "peak_rss_mib": _status_kib("VmHWM") / 1024,
                "end_rss_mib": _status_kib("VmRSS") / 1024,
                "load1": os.getloadavg()[0],
            }
        )
        self._reset_hwm()
        self._t, self._cpu = time.perf_counter(), time.process_time()


def run_child(
    spec: str, holdout: float, seed: int, tmp: str | None, factors: int, iterations: int, trees: int | None
) -> dict:
    import scipy.sparse as sp  # noqa: F401 - imported before the first mark (not a phase cost)

    import batch.training as training
    from batch.als import AlsParams
    from batch.forests import ForestParams
    from batch.model_store import ModelStore
    from batch.plays import PlayCounts, ReadSummary

    users, tracks, plays = parse_size(spec)
    load_start = os.getloadavg()
    phases = Phases()
    matrix = synthetic_plays(users, tracks, plays, seed=seed)
    counts = PlayCounts(
        matrix=matrix,
        user_ids=np.char.add("u", np.arange(users).astype(str)),
        item_ids=np.char.add("t", np.arange(tracks).astype(str)),
        summary=ReadSummary(rows=int(matrix.nnz)),
    )
    phases.mark("generate")
    # The generator's temporaries leave freed heap that glibc keeps mapped (it would count in the retrain's
    # RSS although a process reading the plays from a file never had it): hand it back first.
    rss_before_trim = _status_kib("VmRSS") / 1024
    trimmed = _malloc_trim()
    degree_u, degree_i = np.diff(matrix.indptr), np.bincount(matrix.indices, minlength=tracks)
    data_stats = {
        "nnz": int(matrix.nnz),
        "users_with_plays": int(np.count_nonzero(degree_u)),
        "tracks_with_plays": int(np.count_nonzero(degree_i)),
        "max_user_degree": int(degree_u.max()),
        "max_track_degree": int(degree_i.max()),
        "csr_mib": (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) / 2**20,
    }
    del degree_u, degree_i
    phases.mark("stats")  # the benchmark's own bookkeeping (trim, degrees): in no total

    calls: list[dict] = []
    trainer_calls = 0

    def trainer(m, params, show_progress):
        nonlocal trainer_calls
        trainer_calls += 1
        evaluating = holdout > 0 and trainer_calls == 1
        phases.mark("evaluate:split" if evaluating else ("evaluate:rank" if holdout > 0 else "setup"))
        result = training.numpy_trainer(m, params, show_progress)
        phases.mark("evaluate:train" if evaluating else "train")
        calls.append({"nnz": int(m.nnz), "iteration_s": list(result.seconds), "losses": list(result.losses)})
        return result

    original_build = training.build_forests

    def build_forests(directory, item_ids, item_factors, params):
        phases.mark("publish:arrays")
        out = original_build(directory, item_ids, item_factors, params)
        phases.mark("index")
        return out

    training.build_forests = build_forests
    params = AlsParams(factors=factors, iterations=iterations, seed=seed)
    # playrec's default forest shape (whatever it is at the time of the run), or `--trees N` of it
    forest = ForestParams() if trees is None else dataclasses.replace(ForestParams(), n_trees=trees)
    with tempfile.TemporaryDirectory(prefix="playrec-scale-", dir=tmp) as root:
        report = training.train_and_publish(
            counts,
            ModelStore(root),
            params,
            holdout=holdout,
            forest=forest,
            show_progress=False,
            trainer=trainer,
        )
        phases.mark("publish:checksums")
        version_dir = Path(root) / "models" / report.version
        version_mib = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file()) / 2**20
    training.build_forests = original_build

    getrusage_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    totals: dict[str, dict] = {}
    for row in phases.rows:
        if row["phase"] == "stats":
            continue
        group = row["phase"].split(":")[0]
        group = "train" if group == "setup" else group  # setup = the microseconds before the first call
        acc = totals.setdefault(group, {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mib": 0.0})
        acc["wall_s"] += row["wall_s"]
        acc["cpu_s"] += row["cpu_s"]
        acc["peak_rss_mib"] = max(acc["peak_rss_mib"], row["peak_rss_mib"])
    retrain = [
        r for r in phases.rows if r["phase"] not in ("generate", "stats") and not r["phase"].startswith("evaluate")
    ]
    return {
        "spec": spec,
        "users": users,
        "tracks": tracks,
        "plays": plays,
        "holdout": holdout,
        "factors": factors,
        "iterations": iterations,
        "seed": seed,
        "data": data_stats,
        "phases": phases.rows,
        "totals": totals,
        "retrain_wall_s": sum(r["wall_s"] for r in retrain),
        "retrain_cpu_s": sum(r["cpu_s"] for r in retrain),
        "retrain_peak_rss_mib": max(r["peak_rss_mib"] for r in retrain),
        # resetting VmHWM also resets what getrusage reports, so the process peak is the max over phases
        "process_peak_rss_mib": max(max(r["peak_rss_mib"] for r in phases.rows), getrusage_peak),
        "report_timings": report.timings,
        "trainer_calls": calls,
        "forest": dataclasses.asdict(forest),
        "version_mib": version_mib,
        "rss_after_generate_mib": rss_before_trim,
        "malloc_trim": trimmed,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "cpus": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ---------------------------------------------------------------------------------------------- report


def load_results(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[tuple, dict] = {}
    for r in rows:  # the newest run of each (size, holdout, forest trees) wins
        latest[(r["users"], r["tracks"], r["plays"], r["holdout"], trees_of(r))] = r
    return sorted(latest.values(), key=lambda r: (-trees_of(r), r["holdout"], r["plays"], r["users"]))


def trees_of(r: dict) -> int:
    """Forest trees of a result; results without the field predate it and ran with 50 (the old default)."""
    return int(r.get("forest", {}).get("n_trees", 50))


def loads(r: dict) -> str:
    return f"{r['load_start'][0]:.1f} -> {r['load_end'][0]:.1f}"


def headline_table(results: list[dict]) -> str:
    header = [
        "users x tracks x plays", "trees", "generate s", "train s (ALS iter s, median s/it)", "index s", "publish s",
        "retrain s (min)", "retrain CPU s", "peak RSS retrain / process", "CSR MiB", "load 1-min start -> end",
    ]  # fmt: skip
    rows = []
    for r in results:
        if r["holdout"] > 0:
            continue
        t = r["totals"]
        its = r["trainer_calls"][-1]["iteration_s"]
        rows.append(
            [
                f"{fmt_count(r['users'])} x {fmt_count(r['tracks'])} x {fmt_count(r['plays'])}",
                str(trees_of(r)),
                f"{t['generate']['wall_s']:.1f}",
                f"{t['train']['wall_s']:.1f} ({sum(its):.1f}, {np.median(its):.2f})",
                f"{t['index']['wall_s']:.1f}",
                f"{t['publish']['wall_s']:.1f}",
                f"{r['retrain_wall_s']:.1f} ({r['retrain_wall_s'] / 60:.1f})",
                f"{r['retrain_cpu_s']:.1f}",
                f"{r['retrain_peak_rss_mib'] / 1024:.2f} / {r['process_peak_rss_mib'] / 1024:.2f} GiB",
                f"{r['data']['csr_mib']:.0f}",
                loads(r),
            ]
        )
    return markdown_table(header, rows)


def phase_memory_table(results: list[dict]) -> str:
    names: list[str] = []
    for r in results:
        for p in r["phases"]:
            if p["phase"] not in names:
                names.append(p["phase"])
    header = ["size, holdout, forest"] + [f"{n} s / peak GiB" for n in names]
    rows = []
    for r in results:
        by = {p["phase"]: p for p in r["phases"]}
        cells = [f"{by[n]['wall_s']:.1f} / {by[n]['peak_rss_mib'] / 1024:.2f}" if n in by else "-" for n in names]
        size = (
            f"{fmt_count(r['users'])} x {fmt_count(r['tracks'])} x {fmt_count(r['plays'])}, "
            f"holdout {r['holdout']:g}, {trees_of(r)} trees"
        )
        rows.append([size, *cells])
    return markdown_table(header, rows)


def evaluation_table(results: list[dict]) -> str:
    header = [
        "users x tracks x plays", "holdout", "evaluate s (split / train / rank)", "then train s", "index s",
        "publish s", "total s", "evaluate / train", "trees", "peak RSS process GiB", "load 1-min start -> end",
    ]  # fmt: skip
    rows = []
    for r in results:
        if r["holdout"] <= 0:
            continue
        by = {p["phase"]: p["wall_s"] for p in r["phases"]}
        t = r["totals"]
        ev = t["evaluate"]["wall_s"]
        rows.append(
            [
                f"{fmt_count(r['users'])} x {fmt_count(r['tracks'])} x {fmt_count(r['plays'])}",
                f"{r['holdout']:g}",
                f"{ev:.1f} ({by['evaluate:split']:.1f} / {by['evaluate:train']:.1f} / {by['evaluate:rank']:.1f})",
                f"{t['train']['wall_s']:.1f}",
                f"{t['index']['wall_s']:.1f}",
                f"{t['publish']['wall_s']:.1f}",
                f"{ev + r['retrain_wall_s']:.1f}",
                f"{ev / t['train']['wall_s']:.2f}",
                str(trees_of(r)),
                f"{r['process_peak_rss_mib'] / 1024:.2f}",
                loads(r),
            ]
        )
    return markdown_table(header, rows)


def fit_cost(results: list[dict]) -> tuple[float, float, float]:
    """Least-squares fit of median s/iteration = a * nnz + b over the headline series (fixed users, tracks,
    k): (a, b, max relative error)."""
    head = [r for r in results if r["holdout"] == 0]
    fewest = min(trees_of(r) for r in head)  # the current default's series (the newest runs)
    pts = [
        (c["nnz"], float(np.median(c["iteration_s"])))
        for r in head
        if trees_of(r) == fewest
        for c in r["trainer_calls"]
    ]
    x = np.array([p[0] for p in pts], dtype=np.float64)
    y = np.array([p[1] for p in pts])
    a, b = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)[0]
    err = float(np.max(np.abs(a * x + b - y) / y))
    return float(a), float(b), err


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = [r for r in results if r["holdout"] == 0]
    shapes = sorted({trees_of(r) for r in head})
    rs = [r for r in head if trees_of(r) == shapes[0]]  # the fewest trees: the current default
    old = [r for r in head if trees_of(r) != shapes[0]]
    plays = np.array([r["plays"] for r in rs]) / 1e6
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    n_trees = trees_of(rs[0])
    for key, label in (
        ("train", "train (ALS, 15 it)"),
        ("index", f"index (2 forests, {n_trees} tree)"),
        ("publish", "publish"),
    ):
        ax1.plot(plays, [r["totals"][key]["wall_s"] / 60 for r in rs], "o-", label=label)
    its = [sum(r["trainer_calls"][-1]["iteration_s"]) / 60 for r in rs]
    ax1.plot(plays, its, "o--", color="C0", alpha=0.6, label="of which ALS iterations (rest: loss)")
    ax1.plot(plays, [r["retrain_wall_s"] / 60 for r in rs], "s-k", label="retrain total")
    ax1.plot(
        plays, [r["totals"]["generate"]["wall_s"] / 60 for r in rs], "x:", color="grey", label="generate (bench only)"
    )
    if old:
        po = np.array([r["plays"] for r in old]) / 1e6
        n_old = trees_of(old[0])
        ax1.plot(
            po, [r["totals"]["index"]["wall_s"] / 60 for r in old], "^:", color="C1", label=f"index, {n_old} trees"
        )
        ax1.plot(po, [r["retrain_wall_s"] / 60 for r in old], "s:", color="grey", label=f"retrain, {n_old} trees")
        ax2.plot(
            po, [r["retrain_peak_rss_mib"] / 1024 for r in old], "s:", color="grey", label=f"retrain, {n_old} trees"
        )
    ax1.axhline(30, color="r", ls="--", lw=1, label="target 30 min")
    ax1.set_xlabel("plays (non-zeros), millions")
    ax1.set_ylabel("wall minutes")
    ax1.set_title(f"time, {fmt_count(rs[0]['users'])} users x {fmt_count(rs[0]['tracks'])} tracks, k=40, 15 it")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(plays, [r["retrain_peak_rss_mib"] / 1024 for r in rs], "s-k", label="peak RSS, retrain phases")
    ax2.plot(
        plays, [r["process_peak_rss_mib"] / 1024 for r in rs], "o-", label="peak RSS, whole process (incl. generate)"
    )
    ax2.plot(plays, [r["data"]["csr_mib"] / 1024 for r in rs], "x:", color="grey", label="play-count CSR itself")
    ax2.axhline(8, color="r", ls="--", lw=1, label="target 8 GB")
    ax2.set_xlabel("plays (non-zeros), millions")
    ax2.set_ylabel("GiB")
    ax2.set_title("memory")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    loads_ = ", ".join(f"{r['load_start'][0]:.1f}" for r in rs)
    fig.suptitle(f"playrec train_and_publish, holdout 0, 2-core shared VM (1-min load at start: {loads_})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def report(path: Path, plot_path: Path | None) -> None:
    results = load_results(path)
    print(headline_table(results))
    print()
    print(phase_memory_table(results))
    print()
    if any(r["holdout"] > 0 for r in results):
        print(evaluation_table(results))
        print()
    a, b, err = fit_cost(results)
    r0 = results[0]
    k, steps = r0["factors"], 3
    print(
        f"median s/iteration ~= {a * 1e9:.1f} ns x nnz + {b:.2f} s  ({r0['users']:,} users + {r0['tracks']:,} tracks, "
        f"k={k}; max rel. error {err:.1%}); per non-zero per CG step per factor: {a / (2 * steps * k) * 1e9:.3f} ns"
    )
    if plot_path is not None:
        plot(results, plot_path)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"comma-separated USERSxTRACKSxPLAYS (default {DEFAULT_SIZES})"
    )
    ap.add_argument("--holdout", type=float, default=0.0, help="evaluation holdout (0 = headline retrain only)")
    ap.add_argument("--factors", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trees", type=int, default=None, help="forest n_trees (default: ForestParams())")
    ap.add_argument("--tmp", default=None, help="where the temporary model store goes (default: the system temp)")
    ap.add_argument("--results", type=Path, default=Path("/tmp/playrec-scale.jsonl"), help="JSON lines, appended")
    ap.add_argument("--report", type=Path, default=None, help="print tables from a results file and exit")
    ap.add_argument("--plot", type=Path, default=None, help="with --report: write the PNG plot here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        out = run_child(args.child, args.holdout, args.seed, args.tmp, args.factors, args.iterations, args.trees)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if args.report is not None:
        report(args.report, args.plot)
        return

    print(machine_notes(), flush=True)
    for spec in args.sizes.split(","):
        parse_size(spec)  # fail early on a typo
    for spec in args.sizes.split(","):
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--child", spec, "--holdout", str(args.holdout),
            "--seed", str(args.seed), "--factors", str(args.factors), "--iterations", str(args.iterations),
        ]  # fmt: skip
        if args.tmp:
            cmd += ["--tmp", args.tmp]
        if args.trees is not None:
            cmd += ["--trees", str(args.trees)]
        print(f"== {spec} holdout {args.holdout:g}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(
                f"   {spec}: child failed (exit {proc.returncode}) after {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        with args.results.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(
            f"   {spec}: retrain {result['retrain_wall_s']:.1f} s, "
            f"peak RSS {result['retrain_peak_rss_mib'] / 1024:.2f} GiB "
            f"(process {result['process_peak_rss_mib'] / 1024:.2f}); phases "
            + ", ".join(f"{p['phase']} {p['wall_s']:.1f}s/{p['peak_rss_mib'] / 1024:.2f}G" for p in result["phases"]),
            flush=True,
        )


if __name__ == "__main__":
    main()
