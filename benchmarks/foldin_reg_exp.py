"""The stream's user fold-in with a constant reg (rank-one cached systems) against frequency-scaled reg
(`reg_exp` 1: every changed user's system rebuilt from all their counts), same data, same process.

Last.fm 2K trained twice into temporary stores (10 iterations; reg 20 / reg_exp 0 and the tuner's Last.fm
choice, log alpha 1, reg 0.3, reg_exp 1). The stream is replayed as `stream.worker` calls
`LiveModel.fold_in_users`: `--batches` batches of `--users` Last.fm users each, every user adding 1-3 plays
of artists from their own row (full counts = history + what streamed, with the `UserChange` of the batch);
the first batch warms the caches. Reports the median seconds per batch and the ratio.

    .venv/bin/python benchmarks/foldin_reg_exp.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LASTFM, machine_notes, markdown_table

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.plays import read_play_counts
from batch.training import train_and_publish
from stream.live_model import LiveModel, UserChange


def replay(live: LiveModel, counts, users: np.ndarray, per_batch: int, batches: int, seed: int) -> list[float]:
    """Seconds per fold-in batch (the first, cache-warming batch excluded)."""
    rng = np.random.default_rng(seed)
    m, user_ids, item_ids = counts.matrix, counts.user_ids, counts.item_ids
    streamed: dict[str, dict[str, float]] = {}
    offsets: dict[str, int] = {}
    seconds = []
    for batch in range(batches + 1):
        chosen = rng.choice(users, min(len(users), per_batch), replace=False)
        changes, full = {}, {}
        for row in chosen:
            user = str(user_ids[row])
            tracks = m.indices[m.indptr[row] : m.indptr[row + 1]]
            added = {str(item_ids[t]): 1 for t in rng.choice(tracks, min(len(tracks), int(rng.integers(1, 4))))}
            mine = streamed.setdefault(user, {})
            for t, n in added.items():
                mine[t] = mine.get(t, 0) + n
            before = offsets.get(user, -1)
            offsets[user] = before + 1 if before >= 0 else 0
            change = live.change(user, before if batch else -1, offsets[user], added, mine)
            changes[user] = UserChange(change.before, change.after, change.added)
            full[user] = live.full_counts(user, mine)
        start = time.perf_counter()
        live.fold_in_users(full, changes)
        if batch:
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="users per batch (default 1000)")
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    print(machine_notes())
    counts = read_play_counts(LASTFM)
    users = np.flatnonzero(np.diff(counts.matrix.indptr) > 0)
    rows = []
    results = {}
    for name, params in [
        ("constant reg (reg_exp 0)", AlsParams(iterations=10)),
        ("frequency-scaled (reg_exp 1)", AlsParams(iterations=10, alpha=1.0, reg=0.3, reg_exp=1.0)),
    ]:
        with tempfile.TemporaryDirectory() as tmp:
            store = ModelStore(Path(tmp))
            train_and_publish(counts, store, params, holdout=0, show_progress=False, forest=None)
            live = LiveModel(store.load(), use_index=False)
            seconds = replay(live, counts, users, args.users, args.batches, seed=0)
        results[name] = float(np.median(seconds))
        rows.append([name, f"{results[name] * 1000:.1f} ms", f"{args.users / results[name]:,.0f}"])
    print(markdown_table(["user fold-in", "median s per batch", "users / s"], rows))
    a, b = results.values()
    print(f"frequency-scaled / constant: {b / a:.2f}x the time per batch")


if __name__ == "__main__":
    main()
