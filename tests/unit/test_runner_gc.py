"""The worker's collector tuning (stream.runner.tune_gc)."""

from __future__ import annotations

import gc

from stream.runner import GC_GEN0_THRESHOLD, tune_gc


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # tuned, never disabled: cyclic garbage is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_worker_gil_switch_interval_is_short() -> None:
    """Three Python threads share the GIL in a worker: the switch interval must be well under 5 ms."""
    from stream.runner import GIL_SWITCH_INTERVAL_S

    assert 0 < GIL_SWITCH_INTERVAL_S <= 0.001
