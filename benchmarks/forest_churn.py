"""Forest churn: new tracks re-solved over and over in a large forest (issue #12 item 7).

    PYTHONPATH=. python benchmarks/forest_churn.py [--items 1000000] [--new 20000] [--resolves 10]

Builds the serving forest shape (``batch.forests.ForestParams``: one tree, 64-item leaves, Lloyd-
refined, inner product) over ``--items`` synthetic ALS-like item vectors (k = 40, seeded; the
generator of ``benchmarks/forest_vs_peers.py``) with string ids, then plays the worker's pattern
(``batch.serving.ServingModel._index_tracks``): round 0 adds ``--new`` new tracks in batches of
``--batch``; each of the ``--resolves`` later rounds re-solves every new track once, batch by batch:
``remove(batch ids)`` then ``add(perturbed vectors, same ids)`` (the vector moves by ~5% of its
norm). After each round it measures:

* query latency: median of ``--latency-queries`` single ``query(v, k=10)`` calls (default
  ``search_k``), and of the first query after each re-solve batch (caches rebuilt after a change);
* recall@10 of ``query_batch`` against the exact top 10 over the live items, on a fixed set of
  ``--recall-queries`` user-like queries (exact: base items once, new items per round);
* memory: ``forest.nbytes`` and the process RSS; rows including dead ones; leaf slots (unused:
  of retired leaves) and leaves (retired: replaced by a regrown subtree);
* time per re-solve batch (remove + add): wall median and max, and CPU median (``process_time``,
  less sensitive to other jobs on a shared machine).

BLAS runs on one thread (threadpoolctl). ``--max-batches N`` times only the first N batches of
each round (for slow code paths, e.g. the code before this change); the table says so. Works on
the forest API before and after the churn change (missing ``stats()`` fields are derived).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from forest_vs_peers import als_like_items, user_queries  # noqa: E402

from batch.forests import ForestParams  # noqa: E402
from index import HyperplaneForest  # noqa: E402

K = 10


def rss_mib() -> float:
    """Resident set size of this process in MiB (``/proc/self/status``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product: ``(rows (nq, k) int64, scores (nq, k) float32)``, blocked."""
    rows = np.empty((len(q), k), np.int64)
    scores = np.empty((len(q), k), np.float32)
    for b0 in range(0, len(q), block):
        s = q[b0 : b0 + block] @ x.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, axis=1)
        o = np.argsort(-ps, axis=1)
        rows[b0 : b0 + block] = np.take_along_axis(part, o, axis=1)
        scores[b0 : b0 + block] = np.take_along_axis(ps, o, axis=1)
    return rows, scores


def truth_ids(base: tuple[np.ndarray, np.ndarray], base_ids: np.ndarray, new_x: np.ndarray, new_ids, q) -> np.ndarray:
    """Exact top-K ids over base items (precomputed top K) plus the current new items."""
    r_new, s_new = exact_topk(new_x, q, K)
    ids = np.concatenate([base_ids[base[0]], new_ids[r_new]], axis=1)
    s = np.concatenate([base[1], s_new], axis=1)
    return np.take_along_axis(ids, np.argsort(-s, axis=1, kind="stable")[:, :K], axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, truth)]))


def shape(f: HyperplaneForest) -> dict[str, int]:
    """Rows (dead included), dead rows, leaf slots and the unused ones (retired leaves), leaves with
    room and retired ones: from the arrays (the forest before this change has no such stats)."""
    a = f._arrays()
    rows, cap = len(a["vectors"]), a["leaf_cap"].astype(np.int64)
    return {
        "rows": rows,
        "dead": rows - len(f),
        "slots": len(a["leaf_items"]),
        "unused": len(a["leaf_items"]) - int(cap.sum()),
        "leaves": int((cap > 0).sum()),
        "retired": int((cap == 0).sum()),
    }


def median_latency(f: HyperplaneForest, q: np.ndarray) -> float:
    """Median ms of single ``query`` calls (the forest's default search_k)."""
    t = []
    for v in q:
        t0 = time.perf_counter()
        f.query(v, k=K)
        t.append(time.perf_counter() - t0)
    return 1000 * statistics.median(t)


def perturb(x: np.ndarray, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """A re-solved vector: ``x`` plus noise of ~``scale`` of its norm per coordinate direction."""
    noise = rng.standard_normal(x.shape).astype(np.float32)
    noise *= (scale * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(x.shape[1])).astype(np.float32)
    return (x + noise).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000, help="items the forest is built on")
    ap.add_argument("--new", type=int, default=20_000, help="new tracks added, then re-solved")
    ap.add_argument("--resolves", type=int, default=10, help="re-solve rounds (each re-solves every new track once)")
    ap.add_argument("--batch", type=int, default=200, help="tracks per re-solve batch (one remove + one add)")
    ap.add_argument("--dim", type=int, default=40)
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--max-batches", type=int, default=0, help="time only the first N batches of a round (0: all)")
    ap.add_argument("--refine", type=int, default=None, help="Lloyd passes (default: the forest's, 12 for 1 tree)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x_all, centres = als_like_items(args.items + args.new, args.dim, rng)
    base_x, new_x = x_all[: args.items], x_all[args.items :].copy()
    del x_all
    base_ids = np.array([f"track-{i:07d}" for i in range(args.items)])
    new_ids = np.array([f"new-track-{i:06d}" for i in range(args.new)])
    q_recall = user_queries(args.recall_queries, centres, rng)
    q_lat = user_queries(args.latency_queries, centres, rng)
    t0 = time.perf_counter()
    base_truth = exact_topk(base_x, q_recall, K)
    t_truth = time.perf_counter() - t0

    p = ForestParams()
    t0 = time.perf_counter()
    f = HyperplaneForest(args.dim, "dot", n_trees=p.n_trees, leaf_size=p.leaf_size, seed=p.seed, refine=args.refine)
    f.build(base_x, base_ids)
    t_build = time.perf_counter() - t0
    git = os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip() or "?"
    print(
        f"# forest churn: {args.items:,} items x {args.dim} (dot, n_trees={p.n_trees}, leaf_size={p.leaf_size}, "
        f"refine={f.refine}), {args.new:,} new tracks x {args.resolves} re-solves in batches of {args.batch}; "
        f"code {git}; build {t_build:.1f} s, exact truth {t_truth:.1f} s; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"numpy {np.__version__}; BLAS 1 thread",
        flush=True,
    )
    header = (
        "| round | query ms (median) | first query after a batch, ms | recall@10 | nbytes MiB | RSS MiB "
        "| rows (dead) | leaf slots (unused) | leaves (retired) | ms per batch (median / max) "
        "| CPU ms per batch (median) | round s |"
    )
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")

    def report(
        rnd: str, batch_ms: list[float], cpu_ms: list[float], first_ms: list[float], t_round: float, note: str = ""
    ) -> None:
        lat = median_latency(f, q_lat)
        got, _ = f.query_batch(q_recall, k=K)
        rec = recall(got, truth_ids(base_truth, base_ids, new_x, new_ids, q_recall))
        sh = shape(f)
        bm = f"{statistics.median(batch_ms):.1f} / {max(batch_ms):.1f}{note}" if batch_ms else "-"
        fm = f"{statistics.median(first_ms):.1f}" if first_ms else "-"
        cm = f"{statistics.median(cpu_ms):.1f}" if cpu_ms else "-"
        print(
            f"| {rnd} | {lat:.2f} | {fm} | {rec:.3f} | {f.nbytes / 2**20:.0f} | {rss_mib():.0f} "
            f"| {sh['rows']:,} ({sh['dead']:,}) | {sh['slots']:,} ({sh['unused']:,}) "
            f"| {sh['leaves']:,} ({sh['retired']:,}) | {bm} | {cm} | {t_round:.1f} |",
            flush=True,
        )

    report("built", [], [], [], 0.0)
    n_batches = (args.new + args.batch - 1) // args.batch
    timed = n_batches if not args.max_batches else min(args.max_batches, n_batches)
    note = f" ({timed} of {n_batches} batches)" if timed < n_batches else ""
    for rnd in range(args.resolves + 1):
        batch_ms, cpu_ms, first_ms = [], [], []
        t_round = time.perf_counter()
        for b in range(timed):
            sl = slice(b * args.batch, (b + 1) * args.batch)
            ids = new_ids[sl]
            if rnd:
                new_x[sl] = perturb(new_x[sl], rng)
            t0, c0 = time.perf_counter(), time.process_time()
            if rnd:
                f.remove(ids)
            f.add(new_x[sl], ids)
            batch_ms.append(1000 * (time.perf_counter() - t0))
            cpu_ms.append(1000 * (time.process_time() - c0))
            t0 = time.perf_counter()
            f.query(q_lat[b % len(q_lat)], k=K)
            first_ms.append(1000 * (time.perf_counter() - t0))
        if timed < n_batches and rnd == 0:  # the rest of the new tracks, untimed, so recall sees them all
            f.add(new_x[timed * args.batch :], new_ids[timed * args.batch :])
        report("add" if rnd == 0 else str(rnd), batch_ms, cpu_ms, first_ms, time.perf_counter() - t_round, note)
    print(f"# total {time.perf_counter() - t_start:.0f} s; stats {f.stats()}")


if __name__ == "__main__":
    main()
