"""The development broker (playrec.devbroker) against real Apache Kafka, plus its offline helpers.

Every wait is on a condition with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import msgpack
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.serializer import Deserializer, Serializer

from playrec import devbroker
from playrec.devbroker import BrokerError, DevBroker

ROOT = Path(__file__).resolve().parents[2]
ADDRESS = re.compile(r"^127\.0\.0\.1:(\d+)$")


# kafka-python 3 calls (topic, headers, data), 2.x calls (topic, data): the data is always last.
class _Utf8(Serializer):
    def serialize(self, topic: str, *headers_and_data: object) -> bytes:
        return str(headers_and_data[-1]).encode("utf-8")


class _MsgpackOut(Serializer):
    def serialize(self, topic: str, *headers_and_data: object) -> bytes:
        return msgpack.packb(headers_and_data[-1], use_bin_type=True)


class _MsgpackIn(Deserializer):
    def deserialize(self, topic: str, *headers_and_data: bytes) -> object:
        return msgpack.unpackb(headers_and_data[-1], raw=False)


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-admin")
    try:
        admin.create_topics([NewTopic(name=topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def _producer(bootstrap: str, **config: object) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        key_serializer=_Utf8(),
        value_serializer=_MsgpackOut(),
        max_block_ms=30_000,
        **config,
    )


def _wait_for_partitions(producer: KafkaProducer, topic: str, partitions: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(producer.partitions_for(topic) or ()) < partitions:  # blocks on a metadata refresh
        assert time.monotonic() < deadline, f"topic {topic} never showed {partitions} partitions"


def _consume(consumer: KafkaConsumer, done, timeout: float = 30) -> list:
    """Poll until ``done(records)`` or the deadline; return the records in arrival order."""
    records: list = []
    deadline = time.monotonic() + timeout
    while not done(records):
        assert time.monotonic() < deadline, f"gave up after {timeout} s with {len(records)} records"
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


def _play_events(n: int, users: int) -> list[dict]:
    base = 1_700_000_000_000
    return [
        {"user": f"user-{i % users}-é", "track": f"track-{i * 7 % 53}", "ts": base + i, "ms_played": 1000 + i}
        for i in range(n)
    ]


@pytest.mark.integration
def test_play_events_round_trip_through_a_consumer_group(kafka_bootstrap: str, unique_topic: str) -> None:
    n, partitions = 300, 4
    _create_topic(kafka_bootstrap, unique_topic, partitions)
    events = _play_events(n, users=17)

    producer = _producer(kafka_bootstrap)
    try:
        _wait_for_partitions(producer, unique_topic, partitions)
        futures = [producer.send(unique_topic, key=e["user"], value=e) for e in events]
        producer.flush(timeout=30)
        used_partitions = {f.get(timeout=30).partition for f in futures}
    finally:
        producer.close()
    assert len(used_partitions) > 1, "keys should spread over several partitions"

    consumer = KafkaConsumer(
        unique_topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"group-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        value_deserializer=_MsgpackIn(),
    )
    try:
        records = _consume(consumer, lambda rs: len(rs) >= n)
        consumer.commit()
    finally:
        consumer.close()

    assert len(records) == n
    for r in records:
        assert r.key == r.value["user"].encode("utf-8")
    got_by_user: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        got_by_user[r.value["user"]].append(r.value)
    sent_by_user: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        sent_by_user[e["user"]].append(e)
    assert got_by_user == sent_by_user  # exactly the produced set, in order per key


@pytest.mark.integration
def test_transactions_hide_aborted_records(kafka_bootstrap: str, unique_topic: str) -> None:
    _create_topic(kafka_bootstrap, unique_topic, partitions=1)
    producer = _producer(kafka_bootstrap, transactional_id=f"tx-{unique_topic}")
    try:
        producer.init_transactions()
        for outcome, values in (("commit", ["a", "b", "c"]), ("abort", ["x", "y"]), ("commit", ["end"])):
            producer.begin_transaction()
            for v in values:
                producer.send(unique_topic, key="k", value=v)
            producer.flush(timeout=30)
            if outcome == "commit":
                producer.commit_transaction()
            else:
                producer.abort_transaction()
    finally:
        producer.close()

    consumer = KafkaConsumer(
        unique_topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        value_deserializer=_MsgpackIn(),
    )
    try:
        records = _consume(consumer, lambda rs: any(r.value == "end" for r in rs))
    finally:
        consumer.close()
    assert [r.value for r in records] == ["a", "b", "c", "end"]


def _read_first_line(stream, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no stdout line within {timeout} s")


@pytest.mark.integration
def test_cli_prints_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    lib = devbroker.ensure_jars()  # fills the cache if no earlier start did
    stamp = (lib / ".complete").stat()
    data_dir = tmp_path / "broker"
    stderr_path = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from playrec.devbroker import main; raise SystemExit(main())",
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        try:
            first = _read_first_line(proc.stdout, timeout=120)
            assert first.endswith("\n"), f"broker CLI exited early: {stderr_path.read_text()}"
            address = first.split()[-1]
            assert ADDRESS.match(address), first
            assert f"Apache Kafka {devbroker.KAFKA_VERSION}" in first

            admin = KafkaAdminClient(bootstrap_servers=address)
            try:
                assert admin.describe_cluster()["brokers"]
            finally:
                admin.close()

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, stderr_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()

    err = stderr_path.read_text()
    assert "fetching" not in err, "the second start must reuse the jar cache"
    assert (lib / ".complete").stat().st_mtime_ns == stamp.st_mtime_ns
    assert "shut down completed" in (data_dir / "logs" / "server.log").read_text()
    port = int(ADDRESS.match(address).group(1))
    assert not devbroker._port_open(port), "the broker must be gone after the CLI exits"


@pytest.mark.integration
def test_kept_data_dir_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "kept"
    with DevBroker(data_dir=data_dir) as broker:
        producer = _producer(broker.bootstrap)
        try:
            producer.send("kept", key="u", value={"n": 1}).get(timeout=30)  # auto-created topic
        finally:
            producer.close()
        cluster_id = broker.cluster_id
    assert (data_dir / "kafka-logs" / "meta.properties").is_file()

    with DevBroker(data_dir=data_dir) as broker:  # new ports, same storage, no re-format
        assert broker.cluster_id == cluster_id
        consumer = KafkaConsumer(
            "kept",
            bootstrap_servers=broker.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            value_deserializer=_MsgpackIn(),
        )
        try:
            records = _consume(consumer, lambda rs: len(rs) >= 1)
        finally:
            consumer.close()
    assert [r.value for r in records] == [{"n": 1}]
    assert data_dir.is_dir(), "a caller's data dir is never deleted"


# -- offline checks (no broker) ----------------------------------------------------------------------


def test_resolve_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    assert devbroker.resolve_bootstrap() is None
    monkeypatch.setenv("KAFKA_BOOTSTRAP", " kafka:9092 ")
    assert devbroker.resolve_bootstrap() == "kafka:9092"


def test_server_properties_are_loopback_kraft(tmp_path: Path) -> None:
    text = devbroker.server_properties(tmp_path, 1111, 2222)
    props = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:2222"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1111"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["log.dirs"].startswith(str(tmp_path))


def test_cluster_ids_look_like_kafkas() -> None:
    ids = {devbroker.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) and not i.startswith("-") for i in ids)


def test_missing_maven_is_an_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devbroker.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match=r"Maven.*KAFKA_BOOTSTRAP"):
        devbroker.ensure_jars(tmp_path / "empty-cache")


def test_bootstrap_before_start_is_an_error() -> None:
    with pytest.raises(BrokerError, match="start"):
        _ = DevBroker().bootstrap
