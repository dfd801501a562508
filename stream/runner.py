"""Run a `StreamWorker` in the foreground until SIGTERM/SIGINT (`playrec worker`)."""

from __future__ import annotations

import logging

from stream.settings import WorkerSettings
from stream.topics import ensure_topics

log = logging.getLogger(__name__)


def run_worker(settings: WorkerSettings, loglevel: str = "info") -> int:
    """Create the topics, build the worker and run faust's worker loop; returns the exit status."""
    import faust

    from stream.worker import StreamWorker

    ensure_topics(settings)
    worker = StreamWorker(settings)
    faust_worker = faust.Worker(worker.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    faust_worker.execute_from_commandline()
    return 0
