"""How long a worker takes to be ready again after a restart: resuming its local RocksDB state versus
restoring every table from the changelog (a wiped or stale data directory), at N users.

    python benchmarks/restore.py [--users 100000] [--runs 3]   # KAFKA_BOOTSTRAP, else a dev broker

One worker counts one play for each of N users (so the user-state changelog holds >= N rows), stops
(SIGTERM), then is started `--runs` times on its own data directory ("local state") and `--runs` times
on an empty one ("from the changelog"). Reported per mode: the median seconds from process start to
/ready, and the changelog records restored (the worker's `playrec_changelog_records_restored`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from batch.user_state import changelog_topic  # noqa: E402
from playrec.devbroker import DevBroker, resolve_bootstrap  # noqa: E402
from stream.events import encode_play  # noqa: E402
from tests.faults.harness import publish_model, unique_names  # noqa: E402
from tests.integration.workers import WorkerProcess, wait_for  # noqa: E402

RESTORED = 'playrec_changelog_records_restored{table="user-state"}'


def changelog_records(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(tps).values()) if tps else 0
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, users: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    now = int(time.time() * 1000)
    for i in range(users):
        key, value = encode_play(f"r{i}", f"t{i % 100}", now, 60_000)
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="playrec-restore-"))
    broker = None
    bootstrap = resolve_bootstrap()
    if not bootstrap:
        broker = DevBroker()
        bootstrap = broker.start()
    try:
        store = publish_model(tmp)
        prefix, app_id = unique_names()
        data_dir = tmp / "state"

        def start(directory: Path) -> WorkerProcess:
            return WorkerProcess(
                bootstrap, store.root, prefix, app_id, tmp, table_store=None, data_dir=directory, loglevel="warn"
            )

        worker = start(data_dir)
        try:
            worker.wait_ready(120)
            produce(bootstrap, prefix + "plays", args.users)
            wait_for(lambda: worker.metric("playrec_streams_counted_total") >= args.users, 600, "every play counted")
            # rows reach the changelog a background fold-in after they are counted
            changelog = changelog_topic(app_id)
            wait_for(lambda: changelog_records(bootstrap, changelog) >= args.users, 300, "every row in the changelog")
        finally:
            worker.stop()
        results: dict[str, list[tuple[float, float]]] = {"local state": [], "from the changelog": []}
        for _ in range(args.runs):
            for mode in results:
                directory = data_dir
                if mode == "from the changelog":
                    directory = tmp / "empty"
                    shutil.rmtree(directory, ignore_errors=True)
                started = time.monotonic()
                worker = start(directory)
                try:
                    worker.wait_ready(600)
                    ready_s = time.monotonic() - started
                    results[mode].append((ready_s, worker.metric(RESTORED)))
                finally:
                    worker.stop()
        print(f"restart of one worker holding {args.users:,} users (median of {args.runs} runs):")
        for mode, runs in results.items():
            ready = statistics.median(r for r, _ in runs)
            restored = statistics.median(n for _, n in runs)
            print(f"  {mode:>20}: ready {ready:5.1f} s after start, {restored:,.0f} changelog records restored")
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
