"""`playrec demo`: train on Last.fm 2K, print the evaluation and sample recommendations."""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.plays import read_play_counts
from batch.recommend import Recommender
from batch.training import train_and_publish

log = logging.getLogger(__name__)

DEFAULT_DATA = Path("../shared/data")


class DemoError(RuntimeError):
    """The demo cannot find its data."""


def find_lastfm(data: Path | None) -> Path:
    """Locate Last.fm 2K's user_artists.dat under --data, $PLAYREC_DATA or ../shared/data."""
    roots = [data] if data else [Path(p) for p in filter(None, [os.environ.get("PLAYREC_DATA")])] + [DEFAULT_DATA]
    for root in roots:
        for candidate in (root / "lastfm-2k" / "user_artists.dat", root / "user_artists.dat"):
            if candidate.is_file():
                return candidate
    raise DemoError(
        "cannot find lastfm-2k/user_artists.dat under "
        + ", ".join(str(r) for r in roots)
        + ": pass --data DIR or set PLAYREC_DATA to the folder holding lastfm-2k/"
    )


def artist_names(user_artists: Path) -> dict[str, str]:
    """Artist id -> name from artists.dat next to user_artists.dat (empty if absent)."""
    path = user_artists.with_name("artists.dat")
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows, None)
        return {row[0]: row[1] for row in rows if len(row) >= 2}


def run(args: argparse.Namespace) -> int:
    path = find_lastfm(args.data)
    names = artist_names(path)
    counts = read_play_counts(path)
    print(f"Last.fm 2K: {counts.shape[0]:,} users x {counts.shape[1]:,} artists, {counts.nnz:,} play counts")
    store = ModelStore(args.store)
    report = train_and_publish(
        counts, store, AlsParams(iterations=args.iterations), holdout=0.2, source={"path": str(path)}
    )
    print(f"holdout 20%:  {report.metrics.describe()}")
    print(f"popularity:   {report.baseline.describe()}")
    print(f"published {report.version} to {store.models}  ({report.seconds_per_iteration:.3f} s/iteration)")
    rec = Recommender(store.load())
    user = str(counts.user_ids[0])
    row = rec.user_row(user)
    top_played = sorted(
        zip(
            rec.plays.indices[rec.plays.indptr[row] : rec.plays.indptr[row + 1]],
            rec.plays.data[rec.plays.indptr[row] : rec.plays.indptr[row + 1]],
            strict=True,
        ),
        key=lambda t: -t[1],
    )[:5]
    label = lambda track: f"{names.get(track, track)} ({track})"  # noqa: E731
    print(f"\nuser {user} listens most to: " + ", ".join(label(str(counts.item_ids[i])) for i, _ in top_played))
    print(f"recommended for user {user}:")
    for r in rec.recommend(user, 10):
        print(f"  {r.score:6.3f}  {label(r.track)}")
    seed_track = str(counts.item_ids[top_played[0][0]])
    print(f"\nartists similar to {label(seed_track)}:")
    for r in rec.similar(seed_track, 5):
        print(f"  {r.score:6.3f}  {label(r.track)}")
    return 0
