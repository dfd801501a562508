"""What the one serving model (batch/serving.py) costs per query on top of the bare arithmetic.

Trains Last.fm 2K with `playrec train`'s defaults, then times, in this process and interleaved:

- bare: `top_k(Y @ x, k, streamed)`, the least an exact top-10 can do;
- ServingModel.recommend_vector (what a worker request runs) and ALSModel.recommend (the Python API and
  `playrec recommend`, which also looks up the user's streamed tracks);
- recommend_batch of 256 users per user, against 256 single calls.

Usage: .venv/bin/python benchmarks/serving.py [--queries 2000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import LASTFM
from threadpoolctl import threadpool_limits

from batch.recommend import top_k
from playrec import ALS, PlayCounts


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1e6 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    counts = PlayCounts.from_file(LASTFM)
    with threadpool_limits(limits=1, user_api="blas"):  # one core per query, as in a worker
        model = ALS().fit(counts)
        serving = model.serving
        Y = np.asarray(model.item_factors)
        users = [str(u) for u in model.user_ids[: args.queries]]
        vectors = np.asarray(model.user_factors)[: len(users)]
        streamed = [counts.matrix[i].indices for i in range(len(users))]
        streamed_ids = [set(model.item_ids[s].tolist()) for s in streamed]
        n = len(users)
        block = users[:256]
        results: dict[str, list[float]] = {"bare": [], "serving": [], "api": [], "batch": [], "single": []}
        for _ in range(args.rounds):
            results["bare"].append(per_call_us(lambda i: top_k(Y @ vectors[i], 10, streamed[i]), n))
            results["serving"].append(
                per_call_us(lambda i: serving.recommend_vector(vectors[i], 10, streamed_ids[i]), n)
            )
            results["api"].append(per_call_us(lambda i: model.recommend(users[i], 10), n))
            start = time.perf_counter()
            model.recommend_batch(block, 10)
            results["batch"].append(1e6 * (time.perf_counter() - start) / len(block))
            results["single"].append(per_call_us(lambda i: model.recommend(block[i], 10), len(block)))
    med = {name: float(np.median(v)) for name, v in results.items()}
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs")
    print(f"Last.fm 2K: {len(model.item_ids):,} tracks, k = {model.params.factors}; medians of {args.rounds} rounds")
    print(f"bare top_k(Y @ x):                {med['bare']:8.1f} us/query")
    ratio = med["serving"] / med["bare"]
    print(f"ServingModel.recommend_vector:    {med['serving']:8.1f} us/query  ({ratio:.2f}x bare)")
    print(f"ALSModel.recommend(user):         {med['api']:8.1f} us/query  ({med['api'] / med['bare']:.2f}x bare)")
    print(
        f"recommend_batch, 256 users:       {med['batch']:8.1f} us/user   ({med['single'] / med['batch']:.2f}x faster"
    )
    print(f"  than 256 recommend calls:       {med['single']:8.1f} us/user)")


if __name__ == "__main__":
    main()
