"""How well a few warm-started iterations rank tuner candidates, against a few from the seeded start.

For each data set: the DESIGN.md section 5 split (seed 0), then the tuner's validation split of the
training part (seed 1). Every point of a 46-point grid (log and linear confidence, constant and
frequency-scaled reg) is trained three ways on the validation part: fully (20 iterations from the seeded
start: the truth), 4 iterations warm-started from the defaults' fully trained factors (what
batch.tuning screens by), and 4 iterations from the seeded start (what successive halving's first rung
ranks by). Prints the Spearman correlation of each short ranking with the full one (validation NDCG@10)
and the full scores of the top 5 each picks.

    .venv/bin/python benchmarks/tuning_screen.py --datasets synthetic,lastfm-users30
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tuning import DATASETS, load

from batch.als import AlsParams, train_als
from batch.evaluation import holdout_split, ranking_metrics

GRID = [("log", a, a * r, 0.0) for a in (0.5, 1, 2, 4, 8, 16) for r in (2.5, 10, 40)]
GRID += [("linear", a, r, 0.0) for a in (0.003, 0.03, 0.3) for r in (3, 10, 30)]
GRID += [("log", a, a * r, 1.0) for a in (0.5, 1, 2, 4, 8) for r in (0.1, 0.3, 1)]
GRID += [("linear", a, r, 1.0) for a in (0.03, 0.3) for r in (0.03, 0.1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="synthetic,lastfm-users30", help=f"from {', '.join(DATASETS)}")
    parser.add_argument("--iterations", type=int, default=4, help="short runs' iterations")
    args = parser.parse_args()
    for name in args.datasets.split(","):
        counts = load(name)
        train, _ = holdout_split(counts.matrix, 0.2, seed=0, timestamps=counts.last_played)
        part, valid = holdout_split(train, 0.2, seed=1)
        base = AlsParams()
        start = train_als(part, base, show_progress=False, compute_loss=False)

        def ndcg(fit, part=part, valid=valid) -> float:
            return ranking_metrics(fit.user_factors, fit.item_factors, part, valid, 10, 2000, 0, False).ndcg

        full, warm, cold = [], [], []
        for confidence, alpha, reg, reg_exp in GRID:
            p = replace(base, confidence=confidence, alpha=alpha, reg=reg, reg_exp=reg_exp)
            short = replace(p, iterations=args.iterations)
            full.append(ndcg(train_als(part, p, show_progress=False, compute_loss=False)))
            X, Y = start.user_factors, start.item_factors
            warm.append(
                ndcg(train_als(part, short, user_factors=X, item_factors=Y, show_progress=False, compute_loss=False))
            )
            cold.append(ndcg(train_als(part, short, show_progress=False, compute_loss=False)))
        full_a, warm_a, cold_a = map(np.array, (full, warm, cold))
        print(f"## {name}: {len(GRID)} candidates, {args.iterations} short iterations")
        print(
            f"  Spearman with the full ranking: warm-started {spearmanr(full_a, warm_a)[0]:.3f}, "
            f"seeded start {spearmanr(full_a, cold_a)[0]:.3f}"
        )
        for label, scores in (("full", full_a), ("warm", warm_a), ("seeded", cold_a)):
            top = np.argsort(-scores)[:5]
            print(
                f"  top 5 by {label}: "
                + ", ".join(
                    f"{GRID[i][0]} {GRID[i][1]:g}/{GRID[i][2]:g} E{GRID[i][3]:g} ({full_a[i]:.4f})" for i in top
                )
            )


if __name__ == "__main__":
    main()
