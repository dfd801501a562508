"""What a running worker is waiting on, logged on demand (`kill -USR1 <pid>`): every asyncio task's stack
in every event loop of the process (faust runs the Kafka consumer in a thread with its own loop) and the
consumer's fetch state (flow, active and paused partitions, read offsets, aiokafka's buffered records,
in-flight fetches and per-partition positions). For hangs that leave every thread idle, where a
thread dump (py-spy) shows only the event loops' `select`."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Any

log = logging.getLogger(__name__)

#: Frames shown per task.
STACK_FRAMES = 12


def install_dump_on_signal(app: Any, signum: int = signal.SIGUSR1) -> None:
    """Log `dump_state(app)` whenever the process receives `signum` (main thread only).

    mode's `Worker` installs its own SIGUSR1 handler on the event loop when it starts (a dump of every
    task's stack with its locals, without the consumer's fetch state), which replaces a `signal.signal`
    handler; so for a faust app the app's worker class (`app.conf.Worker`, used by `faust worker`,
    `app.main()` and stream.runner) becomes a subclass that installs this one after mode's."""

    def dump() -> None:
        log.warning("state dump on signal %d:\n%s", signum, dump_state(app))

    signal.signal(signum, lambda _signum, _frame: dump())
    conf = getattr(app, "conf", None)
    if conf is None:
        return
    base = conf.Worker

    class DumpingWorker(base):  # type: ignore[misc, valid-type]
        def install_signal_handlers(self) -> None:
            super().install_signal_handlers()
            self.loop.add_signal_handler(signum, dump)

    conf.Worker = DumpingWorker


def dump_state(app: Any) -> str:
    """Task stacks of every event loop and the consumer's fetch state, as text (never raises)."""
    lines: list[str] = []
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if loop.is_closed():
            continue
        lines.append(f"== event loop {id(loop):#x} (running: {loop.is_running()})")
        for task in _tasks(loop):
            frames = task.get_stack(limit=STACK_FRAMES)
            where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames)) or "(not started)"
            lines.append(f"  {task.get_name()}: {where}")
    lines.append(_consumer_state(app))
    return "\n".join(lines)


def _tasks(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task]:
    for _ in range(5):  # another thread's loop may add tasks while the set is read
        try:
            return list(asyncio.all_tasks(loop))
        except RuntimeError:
            continue
    return []


def _consumer_state(app: Any) -> str:
    try:
        consumer = app.consumer
        lines = [
            f"== consumer: flow_active {consumer.flow_active}, generation {app.consumer_generation_id}, "
            f"in recovery {app.in_recovery}",
            f"  active {sorted(map(tuple, consumer._active_partitions or ()))}",
            f"  paused {sorted(map(tuple, consumer._paused_partitions))}",
            f"  read offsets {sorted((tuple(tp), o) for tp, o in consumer._read_offset.items())}",
        ]
        aiokafka_consumer = consumer._thread._consumer
        fetcher = aiokafka_consumer._fetcher
        lines.append(f"  fetcher: buffered {sorted(map(tuple, fetcher._records))}, in flight {fetcher._in_flight}")
        assignment = aiokafka_consumer._subscription.subscription.assignment
        for tp in sorted(assignment.tps, key=tuple):
            state = assignment.state_value(tp)
            position = state.position if state.has_valid_position else "invalid"
            lines.append(f"  {tuple(tp)}: position {position}, paused {state.paused}")
        return "\n".join(lines)
    except Exception as exc:  # diagnostics only: faust/aiokafka internals may change
        return f"== consumer state unavailable: {type(exc).__name__}: {exc}"
