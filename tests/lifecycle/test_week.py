"""A week of production in a few minutes (issue #21): the whole lifecycle on a real broker, checked
against the producers' own ground truth after every step (tests/lifecycle/week.py)."""

from __future__ import annotations

import pytest

from ..integration.test_real_data import LASTFM, require
from .week import Queries, Week

pytestmark = pytest.mark.integration

#: The day's fault: kill -9 of worker b; a broker restart; worker a killed and its user-state changelog
#: partitions emptied by retention before it comes back (their counts are read again from plays).
FAULTS = ["kill-b", "broker-restart", "retention-a"]


def test_a_week_of_production(tmp_path):
    week = Week(tmp_path, require(LASTFM))
    queries = None
    try:
        week.start()
        queries = Queries(week).start()
        for day, fault in enumerate(FAULTS, start=1):
            week.run_day(day, fault, queries)
        queries.close()
        week.check_queries("the end", queries)
        print(
            f"\nlifecycle: {week.figures}; queries {dict(queries.statuses)}, "
            f"{queries.unavailable_in_faults} unavailable during faults"
        )
    finally:
        if queries is not None:
            queries.close()
        week.close()
