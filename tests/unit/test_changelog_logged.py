"""A slow changelog send is logged while it waits (stream.changelog._logged) and still returns its result."""

from __future__ import annotations

import asyncio
import logging

import stream.changelog as changelog


def test_a_slow_producer_step_is_logged_and_its_result_returned(monkeypatch, caplog) -> None:
    monkeypatch.setattr(changelog, "SLOW_WRITE_S", 0.05)

    async def slow() -> str:
        await asyncio.sleep(0.13)
        return "delivered"

    with caplog.at_level(logging.WARNING, logger="stream.changelog"):
        assert asyncio.run(changelog._logged(slow(), "t-changelog", 3)) == "delivered"
    waits = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert waits and all("t-changelog[3]" in m for m in waits)


def test_a_fast_producer_step_logs_nothing(caplog) -> None:
    async def fast() -> int:
        return 7

    with caplog.at_level(logging.WARNING, logger="stream.changelog"):
        assert asyncio.run(changelog._logged(fast(), "t", 0)) == 7
    assert not caplog.records
