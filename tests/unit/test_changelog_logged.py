"""A slow changelog send is logged while it waits (stream.changelog._logged) and still returns its result."""

from __future__ import annotations

import asyncio
import logging

import pytest

import stream.changelog as changelog


def test_a_slow_producer_step_is_logged_and_its_result_returned(monkeypatch, caplog) -> None:
    monkeypatch.setattr(changelog, "SLOW_WRITE_S", 0.05)

    async def slow() -> str:
        await asyncio.sleep(0.13)
        return "delivered"

    with caplog.at_level(logging.WARNING, logger="stream.changelog"):
        assert asyncio.run(changelog._logged(slow(), object(), "t-changelog", 3, "delivery")) == "delivered"
    waits = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert waits and all("t-changelog[3]" in m and "its delivery" in m for m in waits)
    assert "state unavailable" in waits[0]  # not an aiokafka producer: the diagnostics say so, never raise


def test_a_fast_producer_step_logs_nothing(caplog) -> None:
    async def fast() -> int:
        return 7

    with caplog.at_level(logging.WARNING, logger="stream.changelog"):
        assert asyncio.run(changelog._logged(fast(), object(), "t", 0, "send")) == 7
    assert not caplog.records


def test_a_write_that_never_completes_fails_at_the_deadline(monkeypatch, caplog) -> None:
    """A wedged producer must not hold a worker forever: the write fails (the worker stops unacked)."""
    monkeypatch.setattr(changelog, "SLOW_WRITE_S", 0.02)
    monkeypatch.setattr(changelog, "WRITE_DEADLINE_S", 0.05)

    async def scenario() -> None:
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(changelog.ChangelogWriteError, match=r"t-changelog\[1\] waited .* for its send"):
            await changelog._logged(never, object(), "t-changelog", 1, "send")
        assert never.cancelled()

    with caplog.at_level(logging.WARNING, logger="stream.changelog"):
        asyncio.run(scenario())
    assert any("still waiting" in r.getMessage() for r in caplog.records)  # warned before failing
