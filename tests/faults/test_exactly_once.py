"""Exactly-once counting under kill -9: two workers, 100K plays, one worker killed three times.

Counting is idempotent by source offset (docs/RELIABILITY.md): every user-state row records the
offset of the last play applied, a batch's offsets are committed only after its rows are durable
in the changelog, and a re-delivered play at or below a row's offset is skipped.
"""

from __future__ import annotations

import random
import time

import pytest

from ..integration.workers import WorkerProcess, wait_for
from .harness import (
    PARTITIONS,
    Replay,
    counts_over_http,
    difference,
    play_log,
    publish_model,
    unique_names,
    wait_for_durable_counts,
    wait_for_exact_counts,
)

pytestmark = pytest.mark.integration

N_EVENTS = 100_000
RATE = 2_500  # events/s: the replay lasts ~40 s, long enough for three kills and recoveries
KILLS = 3


def both_ready(a: WorkerProcess, b: WorkerProcess) -> bool:
    ra, rb = a.ready(), b.ready()
    if not (ra and rb):
        return False
    pa, pb = ra["partitions"], rb["partitions"]
    return bool(pa and pb) and sorted(pa + pb) == list(range(PARTITIONS))


@pytest.mark.parametrize("table_store", ["memory://", "rocksdb://"])
def test_kill_9_during_a_replay_loses_and_duplicates_nothing(kafka_bootstrap, tmp_path, table_store):
    """With rocksdb:// (what docker-compose deploys) a killed worker comes back on its own data
    directory, so it resumes the local state the kill left behind."""
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    log = play_log(N_EVENTS, seed=1)
    rng = random.Random(7)

    def start(name: str) -> WorkerProcess:
        return WorkerProcess(
            kafka_bootstrap,
            store.root,
            prefix,
            app_id,
            tmp_path / name,
            table_store=table_store,
            data_dir=tmp_path / f"data-{name[0]}",  # a restarted worker keeps its data directory
            session_timeout=6,
        )

    workers = {"a": start("a"), "b": start("b")}
    try:
        wait_for(lambda: both_ready(workers["a"], workers["b"]), 120, "two workers splitting the partitions")
        replay = Replay(kafka_bootstrap, prefix + "plays", log.records, RATE).start()
        kill_at = sorted(rng.sample(range(N_EVENTS // 10, N_EVENTS * 8 // 10), KILLS))
        recoveries = []
        for n, at in enumerate(kill_at):
            replay.wait_sent(at, 120)
            name = rng.choice(sorted(workers))
            killed_at = time.monotonic()
            workers[name].kill()
            workers[name] = start(f"{name}{n}")  # the same worker comes back, state from the changelog
            try:
                wait_for(lambda: both_ready(workers["a"], workers["b"]), 180, "both workers ready after a kill")
            except AssertionError as exc:  # keep what the workers said for a post-mortem
                tails = "\n".join(f"--- worker {n} (port {w.port}):\n{w.tail(40)}" for n, w in workers.items())
                raise AssertionError(f"{exc}\n{tails}") from None
            recoveries.append(time.monotonic() - killed_at)
        replay.wait(180)
        settle_s = wait_for_exact_counts(lambda: workers["a"], log.expected, 180)
        got = counts_over_http(workers["b"], sorted(log.expected))
        assert difference(log.expected, got) == (0, 0)
        durable_s = wait_for_durable_counts(kafka_bootstrap, app_id, log.expected, 60)
        print(
            f"\nexactly-once ({table_store}): {N_EVENTS} plays ({log.streams} streams, {len(log.expected)} users), "
            f"{KILLS} kill -9 at events {kill_at}, recovery (kill -> both ready) "
            f"{', '.join(f'{r:.1f}' for r in recoveries)} s, counts exact {settle_s:.1f} s after the replay "
            f"(changelog {durable_s:.1f} s later); "
            "lost 0, duplicated 0 (HTTP and changelog)"
        )
    finally:
        for worker in workers.values():
            worker.stop()
