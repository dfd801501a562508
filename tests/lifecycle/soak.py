"""`make soak`: the lifecycle scenario of `tests/lifecycle/week.py` at 50x: ~1M plays over 20 days and
nights, one fault a day drawn from a seeded generator (the seed is printed first, so a failure can be
run again), every invariant checked after every step as in the test.

    .venv/bin/python -m tests.lifecycle.soak [--nights 20] [--scale 3.5] [--seed N] [--write-docs]

`--write-docs` replaces the figures block of docs/RELIABILITY.md (between the `soak:begin` and
`soak:end` markers) with this run's table and command. Exits 1 with the step and the evidence when an
invariant fails.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..integration.test_real_data import LASTFM
from .week import Queries, Week

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
#: The faults a day may draw: a worker killed, the broker restarted, a worker killed while retention
#: empties its user-state changelog partitions.
FAULTS = ["kill-a", "kill-b", "broker-restart", "retention-a", "retention-b"]


def summary(figures: list[dict[str, Any]], queries: Queries, seed: int, args: argparse.Namespace, wall_s: float) -> str:
    """The run as markdown: one line of totals, then a table of the figures per fault kind."""
    plays = sum(f["plays"] for f in figures)
    by_fault: dict[str, list[float]] = {}
    for f in figures:
        by_fault.setdefault(f["fault"], []).append(f["fault_recovery_s"])

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} / {max(values):.1f}"

    def finite(key: str) -> list[float]:
        return [f[key] for f in figures if isinstance(f.get(key), int | float) and f[key] != float("inf")]

    rss = [m for f in figures for m in f["worker_rss_mib"]]
    statuses = dict(sorted(queries.statuses.items()))
    command = f'make soak SOAK_ARGS="--seed {seed} --nights {args.nights} --scale {args.scale}"'
    lines = [
        f"Last soak ({time.strftime('%Y-%m-%d')}, this 2-core machine; `{command}`, {wall_s / 60:.0f} min): "
        f"{len(figures)} days and nights, {plays:,} plays from two producers, every invariant held after "
        f"every step. Model users {figures[0]['model_users']:,} -> {figures[-1]['model_users']:,}; worker RSS "
        f"{min(rss)}-{max(rss)} MiB; queries {statuses} ({queries.unavailable_in_faults} unavailable, all "
        "inside fault windows).",
        "",
        "| figure | median / max |",
        "| --- | --- |",
        *(f"| recovery after `{name}` ({len(v)}x) | {spread(v)} s |" for name, v in sorted(by_fault.items())),
        *(
            [
                f"| emptied changelog restored from `plays` (fault to repaired, {len(finite('repair_s'))}x) | "
                f"{spread(finite('repair_s'))} s |"
            ]
            if finite("repair_s")
            else []
        ),
        f"| new tracks and the hit searchable after the day's plays | {spread(finite('new_tracks_searchable_s'))} s |",
        f"| nightly retrain + both workers swapped | {spread(finite('retrain_s'))} s |",
        f"| fold-in p99 (bucket bound) | {spread(finite('fold_in_p99_s') or [0.0])} s |",
        f"| day (plays, fault, checks) | {spread(finite('day_s'))} s |",
    ]
    return "\n".join(lines)


def write_docs(text: str, path: Path = DOCS) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=20, help="days (and nights) to run (default 20)")
    parser.add_argument("--scale", type=float, default=3.5, help="plays per day x ~14,000 (default 3.5)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the plays and the faults (default: random)")
    parser.add_argument(
        "--root", type=Path, default=None, help="working directory (default: a new temporary one, kept on a failure)"
    )
    parser.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated faults to draw from (default: all of {','.join(FAULTS)})",
    )
    parser.add_argument("--write-docs", action="store_true", help=f"write the figures into {DOCS.name}")
    args = parser.parse_args(argv)
    if not LASTFM.is_file():
        print(f"{LASTFM} is missing: set PLAYREC_DATA to the folder holding lastfm-2k/", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    pool = args.faults.split(",") if args.faults else FAULTS
    unknown = sorted(set(pool) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}: choose from {FAULTS}")
    faults = random.Random(seed).choices(pool, k=args.nights)
    print(f"soak seed {seed}: {args.nights} nights at scale {args.scale}, faults {faults}", flush=True)
    started = time.monotonic()
    root = args.root or Path(tempfile.mkdtemp(prefix="playrec-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    week = Week(root, LASTFM, scale=args.scale, seed=seed)
    queries = None
    try:
        week.start()
        queries = Queries(week).start()
        for day, fault in enumerate(faults, start=1):
            week.run_day(day, fault, queries)
        queries.close()
        week.check_queries("the end", queries)
    except AssertionError as exc:  # an InvariantError, or a deadline of the scenario itself
        print(f"soak seed {seed} FAILED: {exc}\nworker logs and the broker's data are kept in {root}", file=sys.stderr)
        return 1
    finally:
        if queries is not None:
            queries.close()
        week.close()
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    text = summary(week.figures, queries, seed, args, time.monotonic() - started)
    print(json.dumps(week.figures))
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"figures written to {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
