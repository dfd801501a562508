"""The broker restarts in the middle of a replay: the workers reconnect, finish, and count exactly.

This test needs a broker it may stop, so it always starts its own (KAFKA_BOOTSTRAP is not used).
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer

from playrec.devbroker import DevBroker
from stream.events import encode_play

from ..integration.workers import WorkerProcess, free_port, wait_for
from .harness import (
    PARTITIONS,
    Replay,
    play_log,
    publish_model,
    unique_names,
    wait_for_durable_counts,
    wait_for_exact_counts,
)

pytestmark = pytest.mark.integration

N_EVENTS = 30_000
RATE = 1_500
DOWN_S = 5.0


@pytest.mark.parametrize("table_store", ["memory://", "rocksdb://"])
def test_broker_restart_during_a_replay(tmp_path, table_store):
    broker = DevBroker(data_dir=tmp_path / "kafka", port=free_port())
    bootstrap = broker.start()
    store = publish_model(tmp_path)
    prefix, app_id = unique_names()
    log = play_log(N_EVENTS, seed=2)
    workers = [
        WorkerProcess(
            bootstrap, store.root, prefix, app_id, tmp_path / name, table_store=table_store, session_timeout=10
        )
        for name in "ab"
    ]
    try:

        def split() -> bool:
            ready = [w.ready() for w in workers]
            return all(ready) and sorted(p for r in ready for p in r["partitions"]) == list(range(PARTITIONS))

        wait_for(split, 120, "two workers splitting the partitions")
        replay = Replay(bootstrap, prefix + "plays", log.records, RATE).start()
        replay.wait_sent(N_EVENTS * 2 // 5, 120)
        stopped_at = time.monotonic()
        broker.stop()
        time.sleep(DOWN_S)  # the outage itself, not a synchronisation
        assert broker.start() == bootstrap
        restarted_at = time.monotonic()
        for worker in workers:
            assert worker.proc.poll() is None, f"a worker exited during the outage:\n{worker.tail()}"
        # recovered = a play produced after the restart is counted
        key, value = encode_play("probe", "t1", int(time.time() * 1000), 60_000)
        probe = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        probe.send(prefix + "plays", key=key, value=value)
        probe.close()
        log.expected["probe"] = {"t1": 1}
        wait_for(
            lambda: workers[0].request("/users/probe/plays")[1] == {"user": "probe", "plays": {"t1": 1}},
            180,
            "a play produced after the restart to be counted",
        )
        recovered_s = time.monotonic() - restarted_at
        replay.wait(300)
        wait_for(split, 180, "both workers ready again")
        settle_s = wait_for_exact_counts(lambda: workers[0], log.expected, 180)
        durable_s = wait_for_durable_counts(bootstrap, app_id, log.expected, 60)
        print(
            f"\nbroker restart ({table_store}): {N_EVENTS} plays ({log.streams} streams), broker down "
            f"{restarted_at - stopped_at:.1f} s after event {N_EVENTS * 2 // 5}, a new play counted "
            f"{recovered_s:.1f} s after the restart, counts exact {settle_s:.1f} s after the replay "
            f"(changelog {durable_s:.1f} s later); "
            "lost 0, duplicated 0"
        )
    finally:
        for worker in workers:
            worker.stop()
        broker.stop()
