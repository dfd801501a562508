"""One-history merge at scale (#19): a 50M-pair file history plus a 5M-pair stream snapshot.

`playrec retrain` trains on history(live model) + the stream's snapshot (`batch.history.merge_history`).
This benchmark writes a real model store whose live version holds a synthetic history of
`--history` (user, track) pairs over `--users` x `--tracks` (a file-trained model: its training
counts are its history), and a stream snapshot of `--stream` pairs of which `--new-users` users and
`--new-tracks` tracks the model has never seen. A fresh subprocess then loads the live model (memory
mapped, as the retrain does) and the snapshot and runs `merge_history` and `lineage_fields`, reporting
wall / CPU seconds and peak RSS (Linux VmHWM reset before each phase) and checking the result: the
merged total equals history + snapshot, pair by pair on a sample of users.

    .venv/bin/python benchmarks/history_merge.py --history 50M --stream 5M
    .venv/bin/python benchmarks/history_merge.py --history 5M --stream 500K   # a quick run

The retrain's memory target is 8 GB (docs/BENCHMARKS-scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from _common import ROOT, markdown_table
from scale import Phases, parse_count

sys.path.insert(0, str(ROOT))


def random_csr(rng: np.random.Generator, users: int, tracks: int, pairs: int) -> sp.csr_matrix:
    """A (users, tracks) float32 CSR with at least `pairs` distinct entries (when they fit):
    power-law row lengths, Zipf-ish columns, counts 1..~1000."""
    ask = pairs
    for _ in range(4):
        m = _draw_csr(rng, users, tracks, ask)
        if m.nnz >= pairs:
            break
        ask = int(ask * pairs / max(m.nnz, 1) * 1.02)
    return m


def _draw_csr(rng: np.random.Generator, users: int, tracks: int, pairs: int) -> sp.csr_matrix:
    weights = rng.pareto(1.2, users) + 1.0
    lengths = np.minimum(np.floor(weights / weights.sum() * pairs).astype(np.int64) + 1, tracks)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    cols = np.minimum((rng.pareto(0.8, int(indptr[-1])) * tracks / 50).astype(np.int64), tracks - 1)
    counts = np.ceil(rng.pareto(1.5, len(cols)) * 3).astype(np.float32) + 1
    m = sp.csr_matrix((counts, cols.astype(np.int32), indptr), shape=(users, tracks))
    m.sum_duplicates()
    m.sort_indices()
    return m


def generate(args: argparse.Namespace, workdir: Path) -> dict:
    from batch.model_store import ModelStore

    rng = np.random.default_rng(args.seed)
    hist = random_csr(rng, args.users, args.tracks, args.history)
    user_ids = np.array([f"u{i}" for i in range(args.users)])
    item_ids = np.array([f"t{i}" for i in range(args.tracks)])
    k = 40
    store = ModelStore(workdir / "store")

    def extra(directory: Path) -> dict:
        np.save(directory / "plays_indptr.npy", hist.indptr.astype(np.int64), allow_pickle=False)
        np.save(directory / "plays_indices.npy", hist.indices.astype(np.int32), allow_pickle=False)
        np.save(directory / "plays_counts.npy", hist.data.astype(np.float32), allow_pickle=False)
        return {"input": {"source": "file", "path": "synthetic"}, "history": {"arrays": "plays"}, "lineage": []}

    factors_u = rng.standard_normal((args.users, k), dtype=np.float32) * 0.1
    factors_i = rng.standard_normal((args.tracks, k), dtype=np.float32) * 0.1
    version = store.publish(user_ids, item_ids, factors_u, factors_i, extra=extra)
    del factors_u, factors_i
    # The stream: existing users (some pairs overlap the history) plus new users and new tracks.
    s_users, s_tracks = args.users + args.new_users, args.tracks + args.new_tracks
    snap = random_csr(rng, s_users, s_tracks, args.stream)
    perm_u, perm_t = rng.permutation(s_users), rng.permutation(s_tracks)  # the snapshot's own id order
    snap_user_ids = np.array([f"u{i}" for i in perm_u])
    snap_item_ids = np.array([f"t{i}" for i in perm_t])
    np.save(workdir / "snap_indptr.npy", snap.indptr, allow_pickle=False)
    np.save(workdir / "snap_indices.npy", snap.indices, allow_pickle=False)
    np.save(workdir / "snap_counts.npy", snap.data, allow_pickle=False)
    np.save(workdir / "snap_user_ids.npy", snap_user_ids, allow_pickle=False)
    np.save(workdir / "snap_item_ids.npy", snap_item_ids, allow_pickle=False)
    return {"version": version, "history_nnz": int(hist.nnz), "stream_nnz": int(snap.nnz)}


def child(workdir: Path, sample_users: int) -> None:
    from batch.history import lineage_fields, merge_history
    from batch.model_store import ModelStore
    from batch.plays import PlayCounts

    phases = Phases()
    live = ModelStore(workdir / "store").load(verify=False)
    snap_shape = (len(np.load(workdir / "snap_user_ids.npy")), len(np.load(workdir / "snap_item_ids.npy")))
    matrix = sp.csr_matrix(
        tuple(np.load(workdir / f"snap_{n}.npy") for n in ("counts", "indices", "indptr")), shape=snap_shape
    )
    snapshot = PlayCounts(matrix, np.load(workdir / "snap_user_ids.npy"), np.load(workdir / "snap_item_ids.npy"))
    phases.mark("load (mmap)")
    merged = merge_history(live, snapshot)
    phases.mark("merge_history")
    fields = lineage_fields(live, merged.history)
    phases.mark("lineage_fields")
    # Check: merged = history + snapshot, pair by pair, on a sample of users (old and new).
    total = merged.counts
    rng = np.random.default_rng(1)
    row_of = {u: i for i, u in enumerate(total.user_ids.tolist())}
    col_name = total.item_ids
    hist_rows = live.user_index
    h_indptr = np.load(live.artifact("plays_indptr.npy"), mmap_mode="r")
    h_indices = np.load(live.artifact("plays_indices.npy"), mmap_mode="r")
    h_counts = np.load(live.artifact("plays_counts.npy"), mmap_mode="r")
    checked = 0
    for r in rng.choice(snap_shape[0], size=min(sample_users, snap_shape[0]), replace=False):
        user = str(snapshot.user_ids[r])
        want: dict[str, float] = {}
        if user in hist_rows:
            a, b = h_indptr[hist_rows[user]], h_indptr[hist_rows[user] + 1]
            for c, v in zip(h_indices[a:b].tolist(), h_counts[a:b].tolist()):
                want[str(live.item_ids[c])] = want.get(str(live.item_ids[c]), 0.0) + v
        a, b = matrix.indptr[r], matrix.indptr[r + 1]
        for c, v in zip(matrix.indices[a:b].tolist(), matrix.data[a:b].tolist()):
            name = str(snapshot.item_ids[c])
            want[name] = want.get(name, 0.0) + v
        row = row_of[user]
        a, b = total.matrix.indptr[row], total.matrix.indptr[row + 1]
        got = dict(zip(col_name[total.matrix.indices[a:b]].tolist(), total.matrix.data[a:b].tolist()))
        if got != want:
            raise SystemExit(f"merge wrong for user {user}: {len(got)} pairs vs {len(want)} expected")
        checked += 1
    phases.mark("check")
    print(
        json.dumps(
            {
                "phases": phases.rows,
                "merged_users": int(total.shape[0]),
                "merged_tracks": int(total.shape[1]),
                "merged_nnz": int(total.nnz),
                "history_field": fields["history"],
                "checked_users": checked,
                "total_check": bool(
                    abs(float(total.matrix.sum()) - float(h_counts.sum(dtype=np.float64)) - float(matrix.sum()))
                    < 1e-3 * float(total.matrix.sum())
                ),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=parse_count, default=1_000_000)
    ap.add_argument("--tracks", type=parse_count, default=200_000)
    ap.add_argument("--history", type=parse_count, default=50_000_000, help="history pairs (default 50M)")
    ap.add_argument("--stream", type=parse_count, default=5_000_000, help="snapshot pairs (default 5M)")
    ap.add_argument("--new-users", type=parse_count, default=100_000)
    ap.add_argument("--new-tracks", type=parse_count, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-users", type=int, default=2_000, help="users whose merged rows are checked")
    ap.add_argument("--tmp", default=None, help="where the temporary model store goes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child), args.sample_users)
        return
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        begin = time.perf_counter()
        info = generate(args, Path(tmp))
        print(
            f"generated {info['history_nnz']:,} history + {info['stream_nnz']:,} stream pairs in "
            f"{time.perf_counter() - begin:.1f} s",
            flush=True,
        )
        cmd = [sys.executable, __file__, "--child", tmp, "--sample-users", str(args.sample_users)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
        result = json.loads(out.strip().splitlines()[-1])
    rows = [
        [p["phase"], f"{p['wall_s']:.1f}", f"{p['cpu_s']:.1f}", f"{p['peak_rss_mib'] / 1024:.2f}"]
        for p in result["phases"]
    ]
    print(
        f"merged: {result['merged_users']:,} users x {result['merged_tracks']:,} tracks, "
        f"{result['merged_nnz']:,} pairs; {result['checked_users']:,} sampled users exact; "
        f"total equals history + stream: {result['total_check']}"
    )
    print(markdown_table(["phase", "wall s", "CPU s", "peak RSS GiB"], rows))


if __name__ == "__main__":
    main()
