"""Run a `StreamWorker` in the foreground until SIGTERM/SIGINT (`playrec worker`)."""

from __future__ import annotations

import logging

from stream.settings import WorkerSettings
from stream.topics import ensure_topics

log = logging.getLogger(__name__)


def run_worker(settings: WorkerSettings, loglevel: str = "info") -> int:
    """Create the topics, build the worker and run faust's worker loop; returns the exit status."""
    import faust
    from threadpoolctl import threadpool_limits

    from stream.worker import StreamWorker

    # The worker parallelises itself (event loop + fold-in thread); BLAS threads on top of that only
    # contend for the same 2 cores (measured: X^T X updates 12% of the worker's time with OpenBLAS threads).
    threadpool_limits(limits=1, user_api="blas")
    ensure_topics(settings)
    worker = StreamWorker(settings)
    faust_worker = faust.Worker(worker.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    faust_worker.execute_from_commandline()
    return 0
