"""Hyperplane forest vs annoy, hnswlib and exact brute force: recall@10 vs queries/s.

Data (synthetic, ALS-like; no download): item factors = power-law sized clusters of directions
(cluster c has weight ~ c^-1.1) plus noise, scaled by lognormal norms (sigma 0.6), the shape ALS item
factors take (popular items: longer vectors). User queries (MIPS) mix 1-3 cluster centres plus
noise with lognormal norms; track queries (cosine) are item vectors. BLAS is limited to one thread
for everyone (threadpoolctl); hnswlib runs with num_threads=1, annoy with n_jobs=1 and its
per-query loop, the forest with ``query_batch``; exact brute force is blocked BLAS + argpartition.

Forest configurations: ``1x64`` = one tree, leaf_size 64, leaf-scan search (centroid-ranked leaves,
grouped-GEMM re-rank; one-tree forests get Lloyd-refined leaves by default; the recommended shape
is now one tree with leaf_size 96, used by ``--side-only``); ``50x64`` = 50 trees, leaf_size 64, tree-walk search
(the previous default, 100K only). The large set's exact top-10 (10K queries) is computed once in
blocks and cached in ``/tmp/forest_truth_<key>.npy``; brute-force speed is timed on its first 1,024
queries.

The strongest peers (issue #15), side by side: ``--peers [--sets als1m,synth200k] [--rounds 3]
[--single-queries 1000] [--libs forest,scann,faiss-ivfpq,faiss-hnsw,hnswlib,annoy]`` builds every
library of ``benchmarks/ann_peers.py`` on each data set (the 1M ALS-like items, and the item factors
of our ALS trained on the synthetic 200K x 100K x 5M plays, cached in the temp directory), for MIPS
(user queries) and cosine (track queries), and times every knob in alternation between libraries
(``rounds`` rounds, medians): batched (1,000 queries per call, where the library has a batch call)
and one query per call (the first ``single-queries`` queries). Prints per-knob tables (build s,
bytes, q/s, queries per CPU-second, recall@10) and, per recall target (0.95, 0.98), the best
queries per CPU-second of each library and the forest's ratio to the best of ScaNN and FAISS;
writes docs/img/forest_vs_peers_frontier.png.

Usage: python benchmarks/forest_vs_peers.py [--quick] [--n-items N] [--n-queries Q] [--seed S]
Prints markdown tables; writes docs/img/forest_recall_qps.png.

Build side by side: ``--build-only --trees 50 --sizes 100000,1000000 --rounds 3 [--metrics dot,cosine]``
builds the forest (``n_trees=trees, leaf_size=64``) and annoy (``add_item`` loop + ``build(trees,
n_jobs=1)``) on the same data, alternating which goes first, ``rounds`` times per size and metric,
and prints median build seconds, their ratio, and recall@10 of both at equal ``search_k``.

Search side by side on the large set only: ``--side-only --efc 200 --forest-knobs 800,1000,1500
--ef-knobs 80,100,160 --rounds 3 [--leaf-size 96] [--refine N] [--baseline-knobs 11000,15000]``
(hnswlib index cached in ``/tmp``; wall and CPU-time medians; ``--baseline-knobs`` also times the
unrefined one-tree leaf_size-64 forest, the previous recommended shape, in the same rounds).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from index import HyperplaneForest

K = 10
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- data
def als_like_items(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(items (n, dim), centres)``: power-law clusters of directions times lognormal norms."""
    n_clusters = max(8, int(np.sqrt(n) / 2))
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    pop = 1.0 / np.arange(1, n_clusters + 1) ** 1.1
    lab = rng.choice(n_clusters, size=n, p=pop / pop.sum())
    d = centres[lab] + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    norms = rng.lognormal(0.0, 0.6, n).astype(np.float32)
    return (d * norms[:, None]).astype(np.float32), centres


def user_queries(nq: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """User-like vectors: 1-3 random cluster centres, noise, lognormal norm."""
    dim = centres.shape[1]
    n_mix = rng.integers(1, 4, nq)
    q = np.zeros((nq, dim), np.float32)
    for j in range(3):
        pick = rng.integers(0, len(centres), nq)
        q += (j < n_mix)[:, None] * centres[pick] * rng.random((nq, 1)).astype(np.float32)
    q += 0.5 * rng.standard_normal((nq, dim)).astype(np.float32)
    return (q * rng.lognormal(0.0, 0.5, (nq, 1))).astype(np.float32)


# ----------------------------------------------------------------------------- helpers
def exact(x: np.ndarray, q: np.ndarray, metric: str, block: int = 256) -> tuple[np.ndarray, float]:
    """Exact top-K rows ``(nq, K)`` and queries/s (blocked BLAS + argpartition, one thread)."""
    t0 = time.perf_counter()
    xs = x
    if metric == "cosine":
        xs = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    out = np.empty((len(q), K), np.int64)
    for a in range(0, len(q), block):
        s = q[a : a + block] @ xs.T
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        o = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
        out[a : a + block] = np.take_along_axis(top, o, axis=1)
    return out, len(q) / (time.perf_counter() - t0)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / truth.shape[1]


def file_bytes(save) -> int:
    with tempfile.TemporaryDirectory() as d:
        save(d)
        return sum(p.stat().st_size for p in Path(d).iterdir())


def run_forest(x, q, truth, metric, trees, knobs, rows, tag, leaf_size=64, label=None):
    t0 = time.perf_counter()
    f = HyperplaneForest(x.shape[1], metric, n_trees=trees, leaf_size=leaf_size, seed=0).build(x, np.arange(len(x)))
    build = time.perf_counter() - t0
    st = f.stats()
    label = label or f"forest-{trees}x{leaf_size}"
    for sk in knobs:
        t0 = time.perf_counter()
        ids, _ = f.query_batch(q, k=K, search_k=sk)
        qps = len(q) / (time.perf_counter() - t0)
        rows.append((tag, label, f"search_k={sk}", build, st["bytes"], qps, recall(ids, truth)))
    print(f"# {tag} {label}: build {build:.1f} s, {st}", flush=True)
    return f


def run_annoy(x, q, truth, metric, trees, knobs, rows, tag, label=None):
    from ann_peers import annoy_index

    peer = annoy_index(x, "dot" if metric == "dot" else "cosine", knobs, trees=trees)
    for sk in knobs:
        t0 = time.perf_counter()
        found = np.stack([peer.one(v, sk) for v in q])
        qps = len(q) / (time.perf_counter() - t0)
        name = label or f"annoy-{metric}"
        rows.append((tag, name, f"search_k={sk}", peer.build_s, peer.nbytes, qps, recall(found, truth)))


def run_hnsw(x, q, truth, space, knobs, rows, tag, ef_construction=200, m=16):
    import hnswlib

    h = hnswlib.Index(space=space, dim=x.shape[1])
    t0 = time.perf_counter()
    h.init_index(max_elements=len(x), ef_construction=ef_construction, M=m, random_seed=0)
    h.add_items(x, np.arange(len(x)), num_threads=1)
    build = time.perf_counter() - t0
    size = file_bytes(lambda d: h.save_index(os.path.join(d, "h.bin")))
    for ef in knobs:
        h.set_ef(max(ef, K))
        t0 = time.perf_counter()
        ids, _ = h.knn_query(q, k=K, num_threads=1)
        qps = len(q) / (time.perf_counter() - t0)
        rows.append((tag, f"hnswlib-{space}", f"ef={ef}", build, size, qps, recall(ids, truth)))
    return h


def side_by_side(f, h, x, q, truth, forest_knobs, ef_knobs, rounds: int, brute_queries: int = 256, others=()) -> str:
    """Forest, hnswlib and brute force timed in alternation, ``rounds`` times: median queries/s.

    The machine is shared: a single timing of each library at a different moment can be off by 2x
    or more; alternating them and taking medians makes the ratios trustworthy. ``others``: more
    ``(label, forest, knobs)`` timed in the same rounds (e.g. the previous forest shape).
    """
    runs = [(f"forest search_k={sk}", lambda sk=sk: f.query_batch(q, k=K, search_k=sk)[0]) for sk in forest_knobs]
    for label, g, knobs in others:
        runs += [(f"{label} search_k={sk}", lambda g=g, sk=sk: g.query_batch(q, k=K, search_k=sk)[0]) for sk in knobs]
    for ef in ef_knobs:

        def hnsw(ef=ef):
            h.set_ef(ef)
            return h.knn_query(q, k=K, num_threads=1)[0]

        runs.append((f"hnswlib ef={ef}", hnsw))
    qb = q[:brute_queries]
    runs.append(("exact brute force", lambda: exact(x, qb, "dot")[0]))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    cpu: dict[str, list[float]] = {name: [] for name, _ in runs}
    rec: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            ids = fn()
            n = len(ids)
            times[name].append(n / (time.perf_counter() - t0))
            cpu[name].append(n / max(time.process_time() - c0, 1e-9))
            rec[name] = recall(ids, truth[:n])
    med = {name: float(np.median(v)) for name, v in times.items()}
    mcpu = {name: float(np.median(v)) for name, v in cpu.items()}
    out = [
        f"| method | recall@10 | median queries/s ({rounds} rounds) | min - max | x brute "
        "| median queries per CPU-second |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, _ in runs:
        out.append(
            f"| {name} | {rec[name]:.3f} | {med[name]:,.0f} | {min(times[name]):,.0f} - "
            f"{max(times[name]):,.0f} | {med[name] / med['exact brute force']:.1f} | {mcpu[name]:,.0f} |"
        )
    return "\n".join(out)


def side_only(args) -> None:
    """``--side-only``: forest vs hnswlib side by side on the large set only (hnswlib index cached)."""
    import hnswlib

    n = args.big_items
    x, q = big_set(args.seed, n, args.big_queries)
    truth = cached_truth(x, q, f"s{args.seed}_n{n}_q{len(q)}")
    t0 = time.perf_counter()
    f = HyperplaneForest(40, "dot", n_trees=1, leaf_size=args.leaf_size, seed=0, refine=args.refine).build(
        x, np.arange(n)
    )
    print(f"# forest-1x{args.leaf_size} (refine {f.refine}) build {time.perf_counter() - t0:.1f} s, {f.stats()}")
    others = []
    if args.baseline_knobs:
        t0 = time.perf_counter()
        b = HyperplaneForest(40, "dot", n_trees=1, leaf_size=64, seed=0, refine=0).build(x, np.arange(n))
        print(f"# forest-1x64 unrefined build {time.perf_counter() - t0:.1f} s, {b.stats()}", flush=True)
        others.append(("forest-1x64 unrefined", b, [int(v) for v in args.baseline_knobs.split(",")]))
    path = Path(tempfile.gettempdir()) / f"forest_hnsw_ip_s{args.seed}_n{n}_M16_efc{args.efc}.bin"
    h = hnswlib.Index(space="ip", dim=40)
    if path.exists():
        h.load_index(str(path), max_elements=n)
    else:
        t0 = time.perf_counter()
        h.init_index(max_elements=n, ef_construction=args.efc, M=16, random_seed=0)
        h.add_items(x, np.arange(n), num_threads=1)
        print(f"# hnswlib build {time.perf_counter() - t0:.1f} s (efc {args.efc})", flush=True)
        h.save_index(str(path))
    fk = [int(v) for v in args.forest_knobs.split(",")]
    ek = [int(v) for v in args.ef_knobs.split(",")]
    print(f"\n## {n // 1000}K MIPS side by side (hnswlib M=16, ef_construction {args.efc})\n", flush=True)
    print(side_by_side(f, h, x, q, truth, fk, ek, args.rounds, others=others), flush=True)


# ----------------------------------------------------------------------------- strong peers (--peers)
PEER_KNOBS = {  # per library: knobs from fast/low recall to slow/high recall
    "forest": [300, 500, 800, 1200, 2000, 3000, 5000, 8000],
    "forest64": [300, 500, 800, 1200, 2000, 3000, 5000, 8000],
    "scann": [(10, 50), (20, 100), (40, 100), (40, 200), (80, 200), (120, 300), (200, 400), (300, 600)],
    "faiss-ivfpq": [(16, 10), (32, 20), (64, 20), (64, 50), (128, 50), (256, 50), (256, 100), (512, 100)],
    "faiss-hnsw": [16, 32, 48, 64, 96, 128, 256],
    "hnswlib": [20, 40, 60, 80, 120, 160, 320],
    "annoy": [10_000, 30_000, 100_000],
}
TARGETS = (0.95, 0.98)
BATCH = 1000


def synth200k_factors(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(item factors (100K, 40), user factors (200K, 40)) of our ALS (defaults, 15 iterations) on the
    synthetic 200K x 100K x 5M plays; cached in the temp directory."""
    path = Path(tempfile.gettempdir()) / f"peers_synth200k_s{seed}.npz"
    if path.exists():
        z = np.load(path)
        return z["items"], z["users"]
    from _common import load_dataset

    from batch.als import AlsParams, train_als

    plays = load_dataset("synth-200k", seed).plays
    t0 = time.perf_counter()
    r = train_als(plays, AlsParams(iterations=15, seed=seed), compute_loss=False, show_progress=False)
    print(f"# synth-200k ALS trained in {time.perf_counter() - t0:.0f} s", flush=True)
    np.savez(path, items=r.item_factors, users=r.user_factors)
    return r.item_factors, r.user_factors


def peer_sets(names: list[str], seed: int, nq: int):
    """(tag, items, user queries, track queries, cache key) per data set name."""
    for name in names:
        if name == "als1m":
            x, qu = big_set(seed, 1_000_000, nq)
            key = f"als1m_s{seed}"
        elif name == "synth200k":
            x, users = synth200k_factors(seed)
            qu = users[np.random.default_rng([seed, 3]).choice(len(users), nq, replace=False)]
            key = f"synth200k_s{seed}"
        elif name.startswith("als"):  # e.g. als100k: smaller ALS-like sets for smoke runs
            n = int(name[3:-1]) * 1000
            x, qu = big_set(seed, n, nq)
            key = f"{name}_s{seed}"
        else:
            raise SystemExit(f"unknown --sets entry {name!r}: als1m, synth200k or alsNk")
        qt = x[np.random.default_rng([seed, 2, len(x)]).choice(len(x), nq, replace=False)]
        yield name, np.ascontiguousarray(x, np.float32), np.ascontiguousarray(qu, np.float32), qt, key


def build_peers(libs: list[str], x: np.ndarray, metric: str, key: str, trees: int) -> list:
    import ann_peers as peers_lib

    out = []
    for lib in libs:
        knobs = PEER_KNOBS[lib]
        t0 = time.perf_counter()
        if lib == "forest":
            out.append(peers_lib.forest(x, metric, knobs))
        elif lib == "forest64":  # the leaf size `playrec train` published before issue #15
            out.append(peers_lib.forest(x, metric, knobs, leaf_size=64))
        elif lib == "scann":
            out.append(peers_lib.scann(x, metric, knobs))
        elif lib == "faiss-ivfpq":
            out.append(peers_lib.faiss_ivfpq(x, metric, knobs))
        elif lib == "faiss-hnsw":
            out.append(peers_lib.faiss_hnsw(x, metric, knobs, key))
        elif lib == "hnswlib":
            out.append(peers_lib.hnswlib_index(x, metric, knobs, key))
        elif lib == "annoy":
            out.append(peers_lib.annoy_index(x, metric, knobs, trees=trees))
        else:
            raise SystemExit(f"unknown --libs entry {lib!r}")
        print(
            f"# {key} {metric} {out[-1].name}: build {out[-1].build_s:.1f} s "
            f"({time.perf_counter() - t0:.1f} s here), {out[-1].nbytes / 1e6:.1f} MB",
            flush=True,
        )
    return out


def time_peers(peers, q, truth, rounds: int, n_single: int) -> list[dict]:
    """Every (library, knob, mode) timed ``rounds`` times, in alternation; medians."""
    runs = []
    for p in peers:
        for knob in p.knobs:
            if p.batch is not None:

                def batched(p=p, knob=knob):
                    return np.concatenate([p.batch(q[a : a + BATCH], knob) for a in range(0, len(q), BATCH)])

                runs.append((p, knob, f"batch {BATCH}", batched, len(q)))
            qs = q[:n_single]
            runs.append((p, knob, "one", lambda p=p, knob=knob, qs=qs: np.stack([p.one(v, knob) for v in qs]), len(qs)))
    wall: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    cpu: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    rec: dict[int, float] = {}
    for r in range(rounds):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            _, _, _, fn, n = runs[i]
            t0, c0 = time.perf_counter(), time.process_time()
            ids = fn()
            wall[i].append(n / (time.perf_counter() - t0))
            cpu[i].append(n / max(time.process_time() - c0, 1e-9))
            rec[i] = recall(ids, truth[:n])
    return [
        {
            "lib": p.name,
            "knob": knob,
            "mode": mode,
            "build_s": p.build_s,
            "bytes": p.nbytes,
            "qps": float(np.median(wall[i])),
            "qpcpu": float(np.median(cpu[i])),
            "recall": rec[i],
        }
        for i, (p, knob, mode, _, _) in enumerate(runs)
    ]


def best_at(results: list[dict], lib: str, mode: str, target: float) -> dict | None:
    """The knob of ``lib`` with the most queries per CPU-second among those reaching ``target``."""
    ok = [r for r in results if r["lib"] == lib and r["mode"] == mode and r["recall"] >= target]
    return max(ok, key=lambda r: r["qpcpu"]) if ok else None


def frontier_table(results: list[dict], tag: str) -> str:
    libs = list(dict.fromkeys(r["lib"] for r in results))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    quantized = [lib for lib in libs if lib.startswith(("scann", "faiss"))]
    out = [
        f"| {tag} | mode | target | " + " | ".join(libs) + " | best forest / best of ScaNN, FAISS |",
        "|---|---|---:|" + "---:|" * len(libs) + "---:|",
    ]
    for mode in modes:
        for t in TARGETS:
            cells, best_peer, forest = [], 0.0, None
            for lib in libs:
                b = best_at(results, lib, mode, t)
                cells.append("-" if b is None else f"{b['qpcpu']:,.0f} ({b['recall']:.3f} @ {b['knob']})")
                if b is not None and lib in quantized:
                    best_peer = max(best_peer, b["qpcpu"])
                if b is not None and lib.startswith("forest"):
                    forest = max(forest or 0.0, b["qpcpu"])  # the best forest configuration, not the last
            ratio = f"{forest / best_peer:.2f}x" if forest and best_peer else "-"
            out.append(f"| | {mode} | {t} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def knob_table(results: list[dict]) -> str:
    out = [
        "| library | knob | mode | build s | MB | q/s (median) | q/CPU-s (median) | recall@10 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        out.append(
            f"| {r['lib']} | {r['knob']} | {r['mode']} | {r['build_s']:.1f} | {r['bytes'] / 1e6:.0f} | "
            f"{r['qps']:,.0f} | {r['qpcpu']:,.0f} | {r['recall']:.3f} |"
        )
    return "\n".join(out)


def plot_frontier(panels: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    libs = sorted({r["lib"] for rs in panels.values() for r in rs})
    colors = {lib: f"C{i}" for i, lib in enumerate(libs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (tag, rs) in zip(axes[0], panels.items()):
        for lib in libs:
            for mode, ls in ((f"batch {BATCH}", "-"), ("one", ":")):
                pts = sorted((r["recall"], r["qpcpu"]) for r in rs if r["lib"] == lib and r["mode"] == mode)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, ls=ls, color=colors[lib], label=f"{lib} ({mode})")
        ax.set_yscale("log")
        ax.set_xlim(0.8, 1.0)
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries per CPU-second (1 thread)")
        ax.set_title(tag)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def peers_frontier(args) -> None:
    """``--peers``: the forest against ScaNN, FAISS, hnswlib and annoy (module docstring)."""
    libs = args.libs.split(",")
    panels: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    for name, x, qu, qt, key in peer_sets(args.sets.split(","), args.seed, args.big_queries):
        for metric, q in (("dot", qu), ("cosine", qt)):
            tag = f"{name} {'MIPS' if metric == 'dot' else 'cosine'} ({len(x):,} x {x.shape[1]})"
            truth = cached_truth(x, q, f"{key}_{metric}_q{len(q)}", metric)
            peers = build_peers(libs, x, metric, key, args.trees)
            results = time_peers(peers, q, truth, args.rounds, args.single_queries)
            panels[tag] = results
            print(f"\n## {tag}\n\n{knob_table(results)}\n\n{frontier_table(results, tag)}\n", flush=True)
            del peers
    print("\n## queries per CPU-second at recall >= target (best knob of each library)\n")
    for tag, results in panels.items():
        print(frontier_table(results, tag) + "\n")
    plot_frontier(panels, args.peers_plot)
    print(f"plot: {args.peers_plot}; total {time.perf_counter() - t_start:.0f} s", flush=True)


def table(rows, brute_qps) -> str:
    out = [
        "| data | library | knob | build s | bytes | queries/s | x brute | recall@10 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for tag, lib, knob, build, size, qps, rec in rows:
        out.append(
            f"| {tag} | {lib} | {knob} | {build:.1f} | {size / 1e6:.1f} MB | {qps:,.0f} | "
            f"{qps / brute_qps[tag]:.1f} | {rec:.3f} |"
        )
    return "\n".join(out)


def plot(rows, brute_qps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted({r[0] for r in rows}, key=lambda t: (len(t.split()[0]), t))
    libs = sorted({r[1] for r in rows})
    colors = {lib: f"C{i}" for i, lib in enumerate(libs)}  # one colour per library in every panel
    fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4.5), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for lib in sorted({r[1] for r in rows if r[0] == tag}):
            pts = sorted((r[6], r[5]) for r in rows if r[0] == tag and r[1] == lib)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lib, color=colors[lib])
        ax.axhline(brute_qps[tag], color="grey", ls="--", label="exact (numpy BLAS)")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries/s (1 thread)")
        ax.set_title(tag)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def big_set(seed: int, n: int, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """The large data set: its own generator (``[seed, 1, n]``), so its truth can be cached."""
    rng = np.random.default_rng([seed, 1, n])
    x, c = als_like_items(n, 40, rng)
    return x, user_queries(nq, c, rng)


def cached_truth(x: np.ndarray, q: np.ndarray, key: str, metric: str = "dot") -> np.ndarray:
    """Exact top-K of ``q`` (MIPS or cosine), computed once in blocks and cached in ``/tmp``."""
    path = Path(tempfile.gettempdir()) / f"forest_truth_{key}.npy"
    if path.exists():
        t = np.load(path)
        if t.shape == (len(q), K):
            return t
    t, _ = exact(x, q, metric, block=512)
    np.save(path, t)
    return t


def build_side_by_side(
    sizes: list[int], metrics: list[str], trees: int, rounds: int, seed: int, n_queries: int, knobs: list[int]
) -> str:
    """Forest and annoy builds timed in alternation (same process, same data): median seconds,
    forest / annoy ratio, recall@10 at equal search_k (last round's indexes)."""
    import annoy

    out = [
        f"| data | metric | trees | forest build s (median, min-max) | annoy build s (median, min-max) "
        f"| forest / annoy | {' | '.join(f'recall@10 forest / annoy sk={k}' for k in knobs)} |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(knobs),
    ]
    for n in sizes:
        if n >= 500_000:
            x, qu = big_set(seed, n, n_queries)
            items_q = x[np.random.default_rng([seed, 2, n]).choice(n, n_queries, replace=False)]
        else:
            rng = np.random.default_rng(seed)
            x, centres = als_like_items(n, 40, rng)
            qu = user_queries(n_queries, centres, rng)
            items_q = x[rng.choice(n, n_queries, replace=False)]
        for metric in metrics:
            q = qu if metric == "dot" else items_q
            truth, _ = exact(x, q, metric)
            tf: list[float] = []
            ta: list[float] = []
            f = a = None
            for r in range(rounds):
                for which in ("forest", "annoy") if r % 2 == 0 else ("annoy", "forest"):
                    if which == "forest":
                        f = None
                        t0 = time.perf_counter()
                        f = HyperplaneForest(x.shape[1], metric, n_trees=trees, leaf_size=64, seed=0).build(
                            x, np.arange(n)
                        )
                        tf.append(time.perf_counter() - t0)
                    else:
                        a = None
                        t0 = time.perf_counter()
                        a = annoy.AnnoyIndex(x.shape[1], "dot" if metric == "dot" else "angular")
                        for i, v in enumerate(x):
                            a.add_item(i, v)
                        a.build(trees, n_jobs=1)
                        ta.append(time.perf_counter() - t0)
                print(f"# {n // 1000}K {metric} round {r + 1}: forest {tf[-1]:.2f} s, annoy {ta[-1]:.2f} s", flush=True)
            recs = []
            for k in knobs:
                ids, _ = f.query_batch(q, k=K, search_k=k)
                found = np.array(
                    [np.pad(np.asarray(a.get_nns_by_vector(v, K, search_k=k), np.int64), (0, 0)) for v in q]
                )
                recs.append(f"{recall(ids, truth):.3f} / {recall(found, truth):.3f}")
            mf, ma = float(np.median(tf)), float(np.median(ta))
            out.append(
                f"| {n // 1000}K | {metric} | {trees} | {mf:.2f} ({min(tf):.2f}-{max(tf):.2f}) | "
                f"{ma:.2f} ({min(ta):.2f}-{max(ta):.2f}) | {mf / ma:.2f} | {' | '.join(recs)} |"
            )
            print(out[-1], flush=True)
            del f, a
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-items", type=int, default=100_000, help="items of the first data set")
    p.add_argument("--big-items", type=int, default=1_000_000, help="items of the large set (0 skips it)")
    p.add_argument("--n-queries", type=int, default=10_000, help="queries per query set")
    p.add_argument("--peer-queries", type=int, default=2_000, help="queries for annoy's per-query loop")
    p.add_argument("--big-queries", type=int, default=10_000, help="queries on the large set")
    p.add_argument(
        "--add-items",
        type=int,
        default=20_000,
        help="the large set's last items, inserted with add() into a forest built on the rest",
    )
    p.add_argument("--trees", type=int, default=50, help="trees of annoy and of the tree-walk forest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--skip-small", action="store_true", help="only the large set")
    p.add_argument("--skip-annoy-big", action="store_true", help="no annoy on the large set (its build is slow)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the side-by-side timing (0 skips it)")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "forest_recall_qps.png")
    p.add_argument(
        "--build-only",
        action="store_true",
        help="only the build side by side (forest vs annoy, --trees, --sizes, --rounds, --metrics)",
    )
    p.add_argument("--sizes", default="100000,1000000", help="--build-only: comma-separated item counts")
    p.add_argument("--metrics", default="dot,cosine", help="--build-only: comma-separated metrics")
    p.add_argument("--build-queries", type=int, default=1000, help="--build-only: queries for recall@10")
    p.add_argument("--build-knobs", default="2000,10000", help="--build-only: search_k values for recall")
    p.add_argument("--side-only", action="store_true", help="only the large set's side by side (forest vs hnswlib)")
    p.add_argument("--efc", type=int, default=100, help="--side-only: hnswlib ef_construction")
    p.add_argument("--forest-knobs", default="10000,15000", help="--side-only: forest search_k values")
    p.add_argument("--ef-knobs", default="80,160", help="--side-only: hnswlib ef values")
    p.add_argument("--leaf-size", type=int, default=96, help="--side-only: the forest's leaf_size")
    p.add_argument("--refine", type=int, default=None, help="--side-only: Lloyd passes (default: the forest's)")
    p.add_argument(
        "--baseline-knobs", default="", help="--side-only: also time the unrefined 1x64 forest at these search_k"
    )
    p.add_argument("--peers", action="store_true", help="the forest vs ScaNN, FAISS, hnswlib, annoy (issue #15)")
    p.add_argument("--sets", default="als1m,synth200k", help="--peers: data sets (als1m, synth200k, alsNk)")
    p.add_argument("--libs", default="forest,scann,faiss-ivfpq,faiss-hnsw,hnswlib", help="--peers: libraries")
    p.add_argument("--single-queries", type=int, default=1000, help="--peers: queries timed one per call")
    p.add_argument("--peers-plot", type=Path, default=ROOT / "docs" / "img" / "forest_vs_peers_frontier.png")
    args = p.parse_args()
    if args.peers:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        logging.basicConfig(level=logging.WARNING)
        peers_frontier(args)
        return
    if args.side_only:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        logging.basicConfig(level=logging.WARNING)
        side_only(args)
        return
    if args.build_only:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        logging.basicConfig(level=logging.WARNING)
        print(
            "\n"
            + build_side_by_side(
                [int(v) for v in args.sizes.split(",")],
                args.metrics.split(","),
                args.trees,
                max(1, args.rounds),
                args.seed,
                args.build_queries,
                [int(v) for v in args.build_knobs.split(",")],
            )
        )
        return
    if args.quick:
        args.n_items, args.big_items, args.n_queries = 20_000, 60_000, 1_000
        args.peer_queries, args.big_queries, args.add_items, args.trees = 300, 1_000, 2_000, 20
    logging.basicConfig(level=logging.WARNING)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    rows: list[tuple] = []
    brute: dict[str, float] = {}
    fk = [1000, 2000, 4000, 8000, 16000]
    ak = [1000, 5000, 20000, 50000]
    hk = [10, 20, 40, 80, 160]

    x, centres = als_like_items(args.n_items, 40, rng)
    qu = user_queries(args.n_queries, centres, rng)
    qt = x[rng.choice(len(x), args.n_queries, replace=False)]
    npq = min(args.peer_queries, args.n_queries)
    sets = (("dot", qu, f"{len(x) // 1000}K MIPS"), ("cosine", qt, f"{len(x) // 1000}K cosine"))
    for metric, q, tag in () if args.skip_small else sets:
        truth, brute[tag] = exact(x, q, metric)
        print(f"# {tag}: exact brute force {brute[tag]:,.0f} q/s", flush=True)
        f1 = run_forest(x, q, truth, metric, 1, fk, rows, tag)
        run_forest(x, q, truth, metric, args.trees, [2000, 5000, 10000], rows, tag)
        run_annoy(x, q[:npq], truth[:npq], "dot" if metric == "dot" else "angular", args.trees, ak, rows, tag)
        h = run_hnsw(x, q, truth, "ip" if metric == "dot" else "cosine", hk, rows, tag)
        print(table([r for r in rows if r[0] == tag], brute), flush=True)
        if metric == "dot" and args.rounds:
            print(
                f"\n## {tag} side by side\n\n"
                + side_by_side(f1, h, x, q, truth, [4000, 8000], [40, 80], args.rounds, brute_queries=1024),
                flush=True,
            )

    extra = ""
    if args.big_items:
        n = args.big_items
        xb, qb = big_set(args.seed, n, args.big_queries)
        tag = f"{n // 1000}K MIPS"
        truth = cached_truth(xb, qb, f"s{args.seed}_n{n}_q{len(qb)}")
        _, brute[tag] = exact(xb, qb[:1024], "dot")
        print(f"# {tag}: exact brute force {brute[tag]:,.1f} q/s", flush=True)
        g = run_forest(xb, qb, truth, "dot", 1, [5000, 10000, 15000, 20000, 40000], rows, tag)
        na = min(1000, npq)
        run_annoy(xb, qb[:na], truth[:na], "dot", 1, [10000, 50000], rows, tag, label="annoy-dot-1tree")
        if not args.skip_annoy_big:
            run_annoy(xb, qb[:na], truth[:na], "dot", args.trees, [20000, 100000], rows, tag)
        h = run_hnsw(xb, qb, truth, "ip", hk, rows, tag, ef_construction=100)
        print(table([r for r in rows if r[0] == tag], brute), flush=True)
        if args.rounds:
            print(
                f"\n## {tag} side by side\n\n"
                + side_by_side(g, h, xb, qb, truth, [10000, 15000], [80, 160], args.rounds),
                flush=True,
            )
            del h
        # insert after build: base forest + add(), vs the forest built on everything at once
        n0 = n - args.add_items
        f = HyperplaneForest(40, "dot", n_trees=1, leaf_size=64, seed=0).build(xb[:n0], np.arange(n0))
        t0 = time.perf_counter()
        f.add(xb[n0:], np.arange(n0, n))
        t_add = time.perf_counter() - t0
        new = truth >= n0
        lines = [
            "| forest 1x64 | search_k | queries/s | recall@10 | recall of the new items |",
            "|---|---:|---:|---:|---:|",
        ]
        for sk in (10000, 20000):
            for name, h in (("built on 980K + add() 20K", f), ("built on all at once", g)):
                t0 = time.perf_counter()
                ids, _ = h.query_batch(qb, k=K, search_k=sk)
                qps = len(qb) / (time.perf_counter() - t0)
                hit = (ids[:, :, None] == truth[:, None, :]).any(axis=1)
                lines.append(
                    f"| {name} | {sk} | {qps:,.0f} | {recall(ids, truth):.3f} | "
                    f"{hit[new].mean() if new.any() else float('nan'):.3f} |"
                )
        extra = (
            f"\n## add(): {args.add_items:,} items into a {n0:,}-item forest: {t_add:.2f} s "
            f"({args.add_items / t_add:,.0f} items/s); the truth holds {int(new.sum())} new-item slots\n\n"
            + "\n".join(lines)
        )
        print(extra, flush=True)

    print("\n## all results\n")
    print(table(rows, brute))
    plot(rows, brute, args.plot)
    print(f"\nplot: {args.plot}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
