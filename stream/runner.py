"""Run a `StreamWorker` in the foreground until SIGTERM/SIGINT (`playrec worker`)."""

from __future__ import annotations

import gc
import logging
import sys
import time

from batch.user_state import changelog_topic
from stream.diagnostics import install_dump_on_signal
from stream.local_state import bind_local_state, cluster_identity
from stream.settings import WorkerSettings
from stream.topics import LISTENERS_TABLE, ensure_topics
from stream.versions import check_versions

log = logging.getLogger(__name__)

#: Allocations between young-generation collections. CPython's default (700) runs a collection every
#: few dozen events here (each event allocates Kafka record, message and count objects), and every
#: tenth one rescans the middle generation; 50,000 makes it a few per micro-batch.
GC_GEN0_THRESHOLD = 50_000


#: Longest a thread holding the GIL keeps it when another thread waits (CPython default 5 ms). The worker
#: runs three Python threads: the event loop (counting, HTTP), faust's consumer thread (fetching) and the
#: fold-in thread; at 5 ms a fetch that needs the GIL many times stalled for up to ~1 s behind a fold-in.
GIL_SWITCH_INTERVAL_S = 0.0005


def tune_gc() -> None:
    """Freeze the objects alive after start-up (modules, faust app, loaded model) out of the cyclic
    collector and collect the young generation less often: the worker allocates many short-lived,
    acyclic objects per event (freed by reference counting), so frequent collections were pure cost
    (measured: the per-batch counting and row encoding 1.2-1.5x faster, docs/BENCHMARKS-stream.md)."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    gc.callbacks.append(_GcPauses().callback)
    log.info("gc: %d start-up objects frozen, gen0 threshold %d", gc.get_freeze_count(), GC_GEN0_THRESHOLD)


#: A garbage collection that stops every thread of the worker for longer than this is logged.
GC_PAUSE_WARN_S = 0.1


class _GcPauses:
    """gc.callbacks hook: logs collections that pause the worker (every thread waits for them)."""

    def __init__(self) -> None:
        self.started = 0.0

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        paused = time.perf_counter() - self.started
        if paused > GC_PAUSE_WARN_S:
            log.warning(
                "garbage collection of generation %d paused the worker for %.2f s (%d objects collected)",
                info["generation"],
                paused,
                info["collected"],
            )


def run_worker(settings: WorkerSettings, loglevel: str = "info") -> int:
    """Create the topics, build the worker and run faust's worker loop; returns the exit status."""
    from threadpoolctl import threadpool_limits

    from stream.worker import StreamWorker

    check_versions()  # before anything touches the broker: ingest/changelog follow these internals
    # The worker parallelises itself (event loop + fold-in thread); BLAS threads on top of that only
    # contend for the same 2 cores (measured: X^T X updates 12% of the worker's time with OpenBLAS threads).
    threadpool_limits(limits=1, user_api="blas")
    ensure_topics(settings)
    if not settings.table_store.startswith("memory:"):  # the memory store restores from scratch anyway
        changelogs = [changelog_topic(settings.app_id), changelog_topic(settings.app_id, LISTENERS_TABLE)]
        identity = cluster_identity(settings.bootstrap, changelogs, settings.security.kafka_python_kwargs())
        bind_local_state(settings.state_dir, identity)
    worker = StreamWorker(settings)
    tune_gc()
    install_dump_on_signal(worker.app)  # `kill -USR1 <pid>`: log what every task waits on
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    faust_worker = worker.app.conf.Worker(worker.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    faust_worker.execute_from_commandline()
    return 0
