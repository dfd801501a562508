"""Throughput of the faust ingest fast path (stream/ingest.py) vs a plain ``stream.take`` agent.

Produces ``--events`` msgpack play events (DESIGN.md section 3) to a fresh topic with
``--partitions`` partitions (kafka-python, batched, murmur2 partitioner keyed by user id), then runs
one faust worker subprocess (tests/integration/ingest_worker.py) per mode, each with its own
consumer group, and polls its ``/status/`` page to measure sustained events/s (median of
``--window`` second windows, the first window and the tail after completion excluded).

Modes: ``ingest`` (BatchIngest, msgpack decode, per-batch aggregation into a faust Table, one
changelog write per touched user per batch), ``ingest-notable`` (same path, counts kept in a
local dict), ``take`` (``stream.take(max_batch, within=max_latency)``, local dict: the baseline).

    .venv/bin/python benchmarks/stream_ingest.py --events 1000000
    .venv/bin/python benchmarks/stream_ingest.py --bootstrap 127.0.0.1:9092 --modes ingest take
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "integration" / "ingest_worker.py"

log = logging.getLogger("playrec.bench.stream_ingest")


# ------------------------------------------------------------------------------------------ data
def make_events(n: int, users: int, tracks: int, seed: int = 7) -> Iterator[tuple[bytes, bytes]]:
    """``n`` (key, value) play records; users and tracks drawn with a mild skew."""
    rng = random.Random(seed)
    ts0 = int(time.time() * 1000) - 86_400_000
    user_ids = [f"u{i:07d}" for i in range(users)]
    track_ids = [f"t{i:06d}" for i in range(tracks)]
    packb = msgpack.packb
    for i in range(n):
        user = user_ids[min(int(rng.paretovariate(1.2)) - 1, users - 1) if i % 2 else rng.randrange(users)]
        track = track_ids[rng.randrange(tracks)]
        value = packb({"user": user, "track": track, "ts": ts0 + i, "ms_played": 30_000 + i % 200_000})
        yield user.encode(), value


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def produce_plays(
    bootstrap: str, topic: str, events: Iterable[tuple[bytes, bytes]], *, partitions: int = 8, create: bool = True
) -> dict[str, Any]:
    """Produce ``events`` fast with aiokafka's batch API; return counts and the partition of each key.

    Partitions are chosen exactly like the kafka-python / Java default partitioner
    (``murmur2(key) & 0x7fffffff % partitions``), computed once per distinct key; records are
    appended to one ``BatchBuilder`` per partition (no per-record future).  The result holds
    ``count``, ``seconds`` and ``partition_of`` (key bytes -> partition).
    """
    if create:
        create_topic(bootstrap, topic, partitions)
    return asyncio.run(_produce(bootstrap, topic, events, partitions))


async def _produce(bootstrap: str, topic: str, events: Iterable[tuple[bytes, bytes]], n: int) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer
    from kafka.partitioner.default import murmur2  # kafka-python's DefaultPartitioner hash

    all_partitions = list(range(n))
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024
    )
    await producer.start()
    partition_of: dict[bytes, int] = {}
    pending: list[Any] = []
    count = 0
    started = time.monotonic()
    try:
        builders = {p: producer.create_batch() for p in all_partitions}
        for key, value in events:
            p = partition_of.get(key)
            if p is None:
                p = partition_of[key] = (murmur2(key) & 0x7FFFFFFF) % n
            builder = builders[p]
            if builder.append(key=key, value=value, timestamp=None) is None:  # full: ship it
                pending.append(await producer.send_batch(builder, topic, partition=p))
                builder = builders[p] = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None)
            count += 1
        for p, builder in builders.items():
            if builder.record_count():
                pending.append(await producer.send_batch(builder, topic, partition=p))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return {"count": count, "seconds": time.monotonic() - started, "partition_of": partition_of}


# ---------------------------------------------------------------------------------------- worker
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_worker(
    bootstrap: str,
    topic: str,
    app_id: str,
    mode: str,
    data_dir: Path,
    *,
    partitions: int = 8,
    max_batch: int = 10_000,
    max_latency_s: float = 0.05,
    log_path: Path | None = None,
    loglevel: str = "warn",
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``ingest_worker.py worker`` in its own process group; return (process, web port)."""
    port = free_port()
    env = {
        **os.environ,
        "INGEST_BOOTSTRAP": bootstrap,
        "INGEST_TOPIC": topic,
        "INGEST_APP_ID": app_id,
        "INGEST_DATA_DIR": str(data_dir),
        "INGEST_WEB_PORT": str(port),
        "INGEST_MODE": mode,
        "INGEST_PARTITIONS": str(partitions),
        "INGEST_MAX_BATCH": str(max_batch),
        "INGEST_MAX_LATENCY": str(max_latency_s),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    cmd = [sys.executable, str(WORKER), "worker", "-l", loglevel, "--web-port", str(port)]
    cmd += ["--web-host", "127.0.0.1", "--web-bind", "127.0.0.1"]
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    return proc, port


def status(port: int) -> dict[str, Any] | None:
    try:
        return get_json(f"http://127.0.0.1:{port}/status/", timeout=2.0)
    except (OSError, ValueError):
        return None


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return int(proc.returncode or 0)


def measure(port: int, proc: subprocess.Popen[bytes], total: int, window: float, deadline_s: float) -> dict[str, Any]:
    """Poll /status/ until ``total`` events were processed; return rates."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + deadline_s
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        st = status(port)
        now = time.monotonic()
        if st is not None:
            last = st
            if st["events"] > 0:
                samples.append((now, int(st["events"])))
            if st["events"] >= total:
                break
        time.sleep(window)
    else:
        raise RuntimeError(f"timed out; last status {last}")
    assert last is not None
    rates = []
    for (t0, n0), (t1, n1) in itertools.pairwise(samples):
        if n1 >= total:  # the window in which the input ran out is partial
            break
        rates.append((n1 - n0) / (t1 - t0))
    rates = rates[1:] if len(rates) > 2 else rates  # drop the warm-up window
    span = (last["last_at"] or 0) - (last["first_at"] or 0)
    return {
        "events": last["events"],
        "batches": last["batches"],
        "median_eps": statistics.median(rates) if rates else None,
        "windows": len(rates),
        "overall_eps": last["events"] / span if span > 0 else None,
        "rows": last["rows"],
    }


def run_mode(bootstrap: str, topic: str, mode: str, total: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    app_id = f"bench-{mode}-{uuid.uuid4().hex[:8]}"
    log_path = tmp / f"{app_id}.log"
    proc, port = start_worker(
        bootstrap,
        topic,
        app_id,
        mode,
        tmp / app_id,
        partitions=args.partitions,
        max_batch=args.max_batch,
        max_latency_s=args.max_latency,
        log_path=log_path,
    )
    try:
        result = measure(port, proc, total, args.window, args.deadline)
    finally:
        stop_worker(proc)
    result["mode"] = mode
    result["log"] = str(log_path)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--tracks", type=int, default=20_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=10_000)
    p.add_argument("--max-latency", type=float, default=0.05)
    p.add_argument("--window", type=float, default=1.0, help="seconds per throughput window")
    p.add_argument("--deadline", type=float, default=600.0, help="give up on a mode after this many seconds")
    p.add_argument("--modes", nargs="+", default=["ingest-notable", "ingest", "take"])
    p.add_argument("--bootstrap", help="existing broker host:port (default: $KAFKA_BOOTSTRAP or a DevBroker)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    from playrec.devbroker import DevBroker, resolve_bootstrap

    with contextlib.ExitStack() as stack:
        bootstrap = args.bootstrap or resolve_bootstrap()
        if not bootstrap:
            bootstrap = stack.enter_context(DevBroker()).bootstrap
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-")))
        topic = f"bench-plays-{uuid.uuid4().hex[:8]}"
        prod = produce_plays(
            bootstrap, topic, make_events(args.events, args.users, args.tracks), partitions=args.partitions
        )
        log.info(
            "produced %d events to %s in %.1f s (%.0f/s)",
            prod["count"],
            topic,
            prod["seconds"],
            prod["count"] / prod["seconds"],
        )
        results = []
        for mode in args.modes:
            res = run_mode(bootstrap, topic, mode, args.events, args, tmp)
            log.info("%s", res)
            results.append(res)
        by_mode = {r["mode"]: r for r in results}
        print(
            f"\n{args.events} events, {args.partitions} partitions, users={args.users}, tracks={args.tracks}, "
            f"max_batch={args.max_batch}, max_latency={args.max_latency}s, cpus={os.cpu_count()}"
        )
        print(f"{'mode':<16}{'median ev/s':>14}{'overall ev/s':>14}{'batches':>10}")
        for r in results:
            med = f"{r['median_eps']:.0f}" if r["median_eps"] else "-"
            ovr = f"{r['overall_eps']:.0f}" if r["overall_eps"] else "-"
            print(f"{r['mode']:<16}{med:>14}{ovr:>14}{r['batches']:>10}")
        base = by_mode.get("take", {}).get("median_eps")
        for mode in ("ingest-notable", "ingest"):
            fast = by_mode.get(mode, {}).get("median_eps")
            if base and fast:
                print(f"ratio {mode} / take: {fast / base:.1f}x")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
