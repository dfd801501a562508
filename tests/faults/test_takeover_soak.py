"""Take-over recovery never hangs: 5 kill -9 / take-over cycles under a steady replay (the short soak;
`make soak-takeover` runs 50, see benchmarks/soak.py and docs/RELIABILITY.md)."""

from __future__ import annotations

import os
import random

import pytest

from .soak import run_soak

pytestmark = pytest.mark.integration

CYCLES = 5


def test_take_over_recovers_within_30_s_every_cycle_and_counts_stay_exact(kafka_bootstrap, tmp_path):
    seed = int(os.environ.get("PLAYREC_SOAK_SEED", random.randrange(2**31)))
    print(f"\nsoak seed {seed} (PLAYREC_SOAK_SEED={seed} replays it)")
    result = run_soak(kafka_bootstrap, tmp_path, CYCLES, seed, rate=1000)
    print(result.summary())
    assert (result.lost, result.duplicated) == (0, 0)
