"""The stream's user fold-in with a constant reg (rank-one cached systems) against frequency-scaled reg
(`reg_exp` 1: every changed user's system rebuilt from all their counts), same data, same process.

Last.fm 2K trained twice into temporary stores (10 iterations; reg 20 / reg_exp 0 and the tuner's Last.fm
choice, log alpha 1, reg 0.3, reg_exp 1). The stream is replayed as `stream.worker` calls
`LiveModel.fold_in_users`: `--batches` batches of `--users` Last.fm users each, every user adding 1-3 plays
(full counts = history + what streamed, with the `UserChange` of the batch), a share of them of tracks new
to the user (`--new-shares`: under scaled reg those users are rebuilt, a repeat updates the cached
inverse); the first batch warms the caches. Reports the median seconds per batch and the ratio.

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


def replay(
    live: LiveModel, counts, users: np.ndarray, per_batch: int, batches: int, new_share: float, seed: int
) -> list[float]:
    """Seconds per fold-in batch (the first, cache-warming batch excluded); a play is of a track new to the
    user (uniform over the catalogue) with probability `new_share`, else a repeat of one of their tracks."""
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
            picks = rng.choice(tracks, min(len(tracks), int(rng.integers(1, 4))))
            fresh = rng.random(len(picks)) < new_share
            picks[fresh] = rng.integers(0, len(item_ids), int(fresh.sum()))
            added = {str(item_ids[t]): 1 for t in picks}
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
    parser.add_argument("--new-shares", default="0,0.3,1", help="shares of plays of new tracks (default 0,0.3,1)")
    args = parser.parse_args()
    print(machine_notes())
    counts = read_play_counts(LASTFM)
    users = np.flatnonzero(np.diff(counts.matrix.indptr) > 0)
    shares = [float(x) for x in args.new_shares.split(",")]
    seconds: dict[tuple[str, float], float] = {}
    names = []
    for name, params in [
        ("constant reg (reg_exp 0)", AlsParams(iterations=10)),
        ("frequency-scaled (reg_exp 1)", AlsParams(iterations=10, alpha=1.0, reg=0.3, reg_exp=1.0)),
    ]:
        names.append(name)
        with tempfile.TemporaryDirectory() as tmp:
            store = ModelStore(Path(tmp))
            train_and_publish(counts, store, params, holdout=0, show_progress=False, forest=None)
            for share in shares:  # a fresh LiveModel (empty cache) per run
                live = LiveModel(store.load(), use_index=False)
                runs = replay(live, counts, users, args.users, args.batches, share, seed=0)
                seconds[name, share] = float(np.median(runs))
    rows = [
        [f"{share:.0%}"]
        + [f"{seconds[n, share] * 1000:.1f} ms ({args.users / seconds[n, share]:,.0f} users/s)" for n in names]
        + [f"{seconds[names[1], share] / seconds[names[0], share]:.2f}x"]
        for share in shares
    ]
    print(markdown_table(["plays of tracks new to the user", *names, "scaled / constant"], rows))


if __name__ == "__main__":
    main()
