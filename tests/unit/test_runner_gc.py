"""The worker's collector tuning (stream.runner.tune_gc)."""

from __future__ import annotations

import gc

from stream.runner import GC_GEN0_THRESHOLD, tune_gc


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    callbacks = list(gc.callbacks)
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # tuned, never disabled: cyclic garbage is still collected
        assert len(gc.callbacks) == len(callbacks) + 1  # the pause logger
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        gc.callbacks[:] = callbacks


def test_long_collections_are_logged(monkeypatch, caplog) -> None:
    """A collection pauses every thread of the worker: one longer than GC_PAUSE_WARN_S is logged."""
    import stream.runner as runner

    pauses = runner._GcPauses()
    callbacks = list(gc.callbacks)
    gc.callbacks.append(pauses.callback)
    try:
        with caplog.at_level("WARNING", logger="stream.runner"):
            gc.collect(0)  # the young generation: far under the threshold, nothing logged
            assert not caplog.records
            monkeypatch.setattr(runner, "GC_PAUSE_WARN_S", -1.0)
            gc.collect(1)
    finally:
        gc.callbacks[:] = callbacks
    assert "garbage collection of generation 1 paused the worker" in caplog.text


def test_worker_gil_switch_interval_is_short() -> None:
    """Three Python threads share the GIL in a worker: the switch interval must be well under 5 ms."""
    from stream.runner import GIL_SWITCH_INTERVAL_S

    assert 0 < GIL_SWITCH_INTERVAL_S <= 0.001
