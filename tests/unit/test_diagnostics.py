"""The on-demand state dump of a worker (stream.diagnostics): task stacks of every loop, never raising."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from stream.diagnostics import dump_state, install_dump_on_signal


class NoConsumerApp:
    consumer = None  # faust internals missing: the dump says so instead of raising


def test_dump_lists_every_task_and_survives_missing_internals() -> None:
    async def scenario() -> str:
        waiting = asyncio.create_task(asyncio.sleep(5), name="waits-for-a-fetch")
        await asyncio.sleep(0)
        try:
            return dump_state(NoConsumerApp())
        finally:
            waiting.cancel()

    text = asyncio.run(scenario())
    assert "waits-for-a-fetch: sleep:" in text
    assert "consumer state unavailable" in text


def test_the_signal_logs_the_dump(caplog) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        install_dump_on_signal(NoConsumerApp())
        with caplog.at_level(logging.WARNING, logger="stream.diagnostics"):
            os.kill(os.getpid(), signal.SIGUSR1)
        assert "state dump on signal" in caplog.text
    finally:
        signal.signal(signal.SIGUSR1, previous)
