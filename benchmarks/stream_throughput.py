"""End-to-end throughput and freshness of one `playrec worker` against a real Kafka broker.

1. **Throughput**: pre-produces ``--events`` Last.fm-shaped play events (benchmarks/_stream_load.py:
   2/3 existing Last.fm 2K users, 1/3 new users out of 20 000, artists by row of user_artists.dat,
   ``ms_played`` 200 000, ``ts`` now, ``stream.events.encode_play``, keyed by user, default murmur2
   partitioner) to ``<prefix>plays`` (8 partitions) with ``--producers`` processes, then starts ONE
   worker subprocess (tests/integration/workers.py) and polls ``/metrics`` every 0.5 s until
   ``playrec_events_processed_total`` reaches ``--events``.  Reports the sustained rate (median over
   5-s windows after the first event), the overall rate (first to last event) and the worker's
   ``playrec_batch_seconds`` / ``playrec_batch_events`` histograms.
2. **Freshness under load**: with the worker caught up (and, with ``--freshness-workers N``, N-1 more
   workers started and ready), a background process produces ``--load-rate`` events/s while
   ``--probes`` probes run, one per ``--probe-interval`` (0.1 s): probe i produces one play of a known
   artist for a brand-new user ``probe-<run>-<i>`` and polls ``GET /users/<user>/recommendations?k=10``
   (keep-alive http.client connections, every ``--poll-interval`` 0.05 s) until it answers
   ``"source": "fold-in"`` (new-user latency); ``--settle`` (2.5 s) later it produces the user's second
   play and polls with ``exclude_streamed=false`` until the items change (existing-user latency: the
   background fold-in published the new vector). Latency = first such answer - just before the send.

Broker: ``KAFKA_BOOTSTRAP`` if set, else a DevBroker.  Model: ``--store`` or Last.fm 2K trained into
a temporary store (``playrec train --holdout 0 --iterations 10``).  Data: ``PLAYREC_DATA`` or
``../shared/data``.

    .venv/bin/python benchmarks/stream_throughput.py                     # 1M events, 1000 probes
    .venv/bin/python benchmarks/stream_throughput.py --quick             # 200K events, 200 probes
    .venv/bin/python benchmarks/stream_throughput.py --profile /tmp/prof # py-spy raw profiles of the worker
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import http.client
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._stream_load import LASTFM, load_lastfm  # noqa: E402
from tests.integration.workers import WorkerProcess, wait_for  # noqa: E402

LOAD = ROOT / "benchmarks" / "_stream_load.py"
PY_SPY = Path(sys.executable).parent / "py-spy"
METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")

TARGET_SUSTAINED = 20_000.0
TARGET_P99_S = 1.0


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------ setup
def train_store(out: Path, plays: Path) -> Path:
    cmd = [sys.executable, "-m", "playrec.cli", "train", "--plays", str(plays), "--out", str(out)]
    cmd += ["--holdout", "0", "--iterations", "10", "--no-progress"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="stream-throughput-admin")
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def load_cmd(mode: str, bootstrap: str, topic: str, run: str, seed: int, **flags: Any) -> list[str]:
    cmd = [sys.executable, str(LOAD), mode, "--bootstrap", bootstrap, "--topic", topic, "--run", run]
    cmd += ["--seed", str(seed)]
    for name, value in flags.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def produce_bulk(
    bootstrap: str, topic: str, run: str, events: int, producers: int, partitions: int, event_ids: bool = False
) -> dict:
    """Pre-produce ``events`` with ``producers`` processes in parallel; return totals."""
    shares = [events // producers + (1 if i < events % producers else 0) for i in range(producers)]
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            load_cmd(
                "bulk",
                bootstrap,
                topic,
                run,
                seed=1000 + i,
                events=share,
                partitions=partitions,
                event_ids=int(event_ids),
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, share in enumerate(shares)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"bulk producer exited with {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    seconds = time.monotonic() - started
    total = sum(r["events"] for r in results)
    return {"events": total, "seconds": seconds, "rate": total / seconds, "per_process": results}


# ---------------------------------------------------------------------------------------- metrics
def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads) from /proc, or NaN."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "stream", "batch", "index"], cwd=ROOT, capture_output=True, text=True
        )
        changed = len(dirty.stdout.splitlines())
        return f"{head.stdout.strip()}" + (f" + {changed} uncommitted files in stream/batch/index" if changed else "")
    except OSError:
        return "unknown"


class MetricsClient:
    """Keep-alive GET /metrics; returns {name: summed value over labels}."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self) -> dict[str, float] | None:
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.conn.request("GET", "/metrics")
                response = self.conn.getresponse()
                text = response.read().decode()
                if response.status != 200:
                    return None
                break
            except (OSError, http.client.HTTPException):
                with contextlib.suppress(Exception):
                    self.conn.close()  # type: ignore[union-attr]
                self.conn = None
        else:
            return None
        values: dict[str, float] = {}
        for line in text.splitlines():
            match = METRIC_LINE.match(line)
            if match and not line.startswith("#"):
                values[match[1]] = values.get(match[1], 0.0) + float(match[3])
        return values


def window_rates(samples: list[tuple[float, float]], start: float, end: float, window: float) -> list[float]:
    """Events/s per whole ``window`` between ``start`` and ``end`` (counter linearly interpolated)."""

    def at(t: float) -> float:
        for (t0, c0), (t1, c1) in itertools.pairwise(samples):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
        return samples[-1][1] if t > samples[-1][0] else samples[0][1]

    rates = []
    t = start
    while t + window <= end + 1e-9:
        rates.append((at(t + window) - at(t)) / window)
        t += window
    return rates


def measure_throughput(worker: WorkerProcess, events: int, deadline_s: float, window: float) -> dict[str, Any]:
    client = MetricsClient(worker.port)
    samples: list[tuple[float, float]] = []  # (monotonic, events processed)
    cpu_at: list[tuple[float, float]] = []  # (monotonic, worker CPU seconds)
    loads: list[str] = []
    started = time.monotonic()
    deadline = started + deadline_s
    last: dict[str, float] = {}
    next_load = started
    while True:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        values = client.get()
        now = time.monotonic()
        cpu_at.append((now, cpu_seconds(worker.proc.pid)))
        if values is not None:
            last = values
            samples.append((now, values.get("playrec_events_processed_total", 0.0)))
            if samples[-1][1] >= events:
                break
        if now >= next_load:
            loads.append(load_avg())
            next_load = now + 10
        if now > deadline:
            raise RuntimeError(f"deadline: {samples[-1][1] if samples else 0:.0f} of {events} events processed")
        time.sleep(max(0.0, 0.5 - (time.monotonic() - now)))
    first = next(i for i, (_, c) in enumerate(samples) if c > 0)
    t_first, c_first = samples[first]
    cpu = cpu_at[-1][1] - next(v for t, v in cpu_at if t >= t_first)
    t_end, c_end = samples[-1]
    active = samples[first:]
    rates = window_rates(active, t_first, t_end, window)
    cpu_windows = window_rates([x for x in cpu_at if x[0] >= t_first], t_first, t_end, window)
    per_cpu = [r / c for r, c in zip(rates, cpu_windows, strict=False) if c > 0]
    return {
        "events": c_end,
        "wait_first_event_s": t_first - started,
        "seconds": t_end - t_first,
        "overall_rate": (c_end - c_first) / (t_end - t_first) if t_end > t_first else float("nan"),
        "sustained_rate": statistics.median(rates) if rates else float("nan"),
        "window_rates": [round(r) for r in rates],
        "events_per_cpu_s_windows": [round(r) for r in per_cpu],
        "worker_cpu_s": cpu,
        "worker_cpu_share": cpu / (t_end - t_first) if t_end > t_first else float("nan"),
        "events_per_cpu_s": (c_end - c_first) / cpu if cpu > 0 else float("nan"),
        "batch_seconds_sum": last.get("playrec_batch_seconds_sum", 0.0),
        "batch_count": last.get("playrec_batch_seconds_count", 0.0),
        "batch_events_sum": last.get("playrec_batch_events_sum", 0.0),
        "user_fold_ins": last.get("playrec_user_fold_ins_total", 0.0),
        "dead_letters": last.get("playrec_dead_letters_total", 0.0),
        "load_averages": loads,
    }


# ------------------------------------------------------------------------------------- freshness
class Prober:
    """Freshness probes in two phases per probe user ``probe-<run>-<i>`` (both must be <= 1 s):

    1. *new user*: produce one play for the brand-new user, poll ``GET /users/<user>/recommendations``
       until it answers ``"source": "fold-in"`` (the play was counted: a user with counts and no vector
       yet is folded in when asked, so this measures fetch + counting);
    2. *existing user*: ``settle_s`` later (the first play's fold-in has written the user's vector),
       read the answer with ``exclude_streamed=false`` (items depend on the vector only), produce a
       second play (another artist) and poll until the answer differs: the background fold-in took
       the play and published the new vector (fetch + counting + fold-in).

    ``pollers`` threads share the pending polls (a heap ordered by due time; a thread waits on the condition
    until the earliest poll is due, so a new probe never waits behind a poll due later); each probe is polled
    every ``poll_s`` (or 5% of its age once that is longer: +-2.5% resolution), over one keep-alive
    connection per thread, so a worker that falls behind is not buried in polls.
    """

    def __init__(
        self, bootstrap: str, topic: str, port: int, run: str, poll_s: float, deadline_s: float, settle_s: float
    ) -> None:
        from kafka import KafkaProducer

        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
        self.topic, self.port, self.run, self.poll_s, self.deadline_s = topic, port, run, poll_s, deadline_s
        self.settle_s = settle_s
        # heap of (due, seq, [sent, i, user, phase, second artist, baseline body]);
        # phase 0 = wait for the new user, 1 = settle, 2 = wait for the change
        self.pending: list[tuple[float, int, list[Any]]] = []
        self.seq = itertools.count()
        self.cond = threading.Condition()
        self.latency: dict[int, float | None] = {}
        self.latency_existing: dict[int, float | None] = {}
        self.polls = 0
        self.closed = False
        self.acked: list[float] = []  # seconds from each probe play's send to the broker's ack

    def _produce(self, user: str, artist: str) -> float:
        from stream.events import encode_play

        key, value = encode_play(user, artist, int(time.time() * 1000), 200_000)
        sent = time.perf_counter()
        future = self.producer.send(self.topic, key=key, value=value)
        future.add_callback(lambda _metadata: self.acked.append(time.perf_counter() - sent))
        return sent

    def send(self, i: int, artist: str, second: str) -> None:
        user = f"probe-{self.run}-{i}"
        sent = self._produce(user, artist)
        self.push(sent + self.poll_s, [sent, i, user, 0, second, None])

    def push(self, due: float, item: list[Any]) -> None:
        with self.cond:
            heapq.heappush(self.pending, (due, next(self.seq), item))
            self.cond.notify()

    def done(self) -> bool:
        with self.cond:
            return len(self.latency_existing) >= len(self.latency) and not self.pending

    def poller(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while True:
            with self.cond:  # wait for the earliest due poll on the condition: a poll pushed meanwhile with
                while True:  # an earlier due time (a new probe) must not wait behind one due later
                    if not self.pending:
                        if self.closed:
                            conn.close()
                            return
                        self.cond.wait(0.1)
                        continue
                    delay = self.pending[0][0] - time.perf_counter()
                    if delay <= 0:
                        break
                    self.cond.wait(delay)
                _, _, item = heapq.heappop(self.pending)
            sent, i, user, phase, second, baseline = item
            if phase == 1:  # settled: read the baseline, then produce the second play
                body, conn = self.fetch(conn, user, exclude_streamed=False)
                sent2 = self._produce(user, second)
                with self.cond:
                    self.polls += 1
                self.push(sent2 + self.poll_s, [sent2, i, user, 2, second, body])
                continue
            if phase == 0:
                body, conn = self.fetch(conn, user)
                ok = body is not None and body.get("source") == "fold-in"
            else:
                body, conn = self.fetch(conn, user, exclude_streamed=False)
                ok = body is not None and baseline is not None and body.get("items") != baseline.get("items")
            now = time.perf_counter()
            with self.cond:
                self.polls += 1
                results = self.latency if phase == 0 else self.latency_existing
                if ok:
                    results[i] = now - sent
                elif now - sent > self.deadline_s:
                    results[i] = None
                    if phase == 0:
                        self.latency_existing[i] = None
            if ok and phase == 0:
                self.push(now + self.settle_s, [now, i, user, 1, second, None])
            elif not ok and now - sent <= self.deadline_s:  # back off with age (5% of it): bounds late polls
                self.push(now + max(self.poll_s, 0.05 * (now - sent)), item)

    def fetch(
        self, conn: http.client.HTTPConnection, user: str, exclude_streamed: bool = True
    ) -> tuple[dict | None, http.client.HTTPConnection]:
        query = "k=10" if exclude_streamed else "k=10&exclude_streamed=false"
        try:
            conn.request("GET", f"/users/{user}/recommendations?{query}")
            response = conn.getresponse()
            body = response.read()
            return (json.loads(body) if response.status == 200 else None), conn
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()
            return None, http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.producer.close(timeout=10)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def latency_summary(latencies: list[float | None]) -> dict[str, float]:
    """answered / timeouts (None) / p50 / p90 / p99 / max of probe latencies in seconds."""
    ok = [x for x in latencies if x is not None]
    summary = {"answered": len(ok), "timeouts": len(latencies) - len(ok)}
    return summary | {f"p{q}": percentile(ok, q) for q in (50, 90, 99)} | {"max": max(ok) if ok else float("nan")}


def summed_metrics(clients: list[MetricsClient]) -> dict[str, float]:
    """Metrics summed over several workers (a worker that does not answer counts as empty)."""
    total: dict[str, float] = {}
    for client in clients:
        for name, value in (client.get() or {}).items():
            total[name] = total.get(name, 0.0) + value
    return total


def measure_freshness(
    bootstrap: str,
    topic: str,
    workers: list[WorkerProcess],
    run: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Probes through the first worker (requests for users another worker owns are routed to it);
    rates, CPU and batch figures are summed over `workers`."""
    worker = workers[0]
    _, rows = load_lastfm(LASTFM)
    rng = random.Random(42)
    artists = [rows[int(rng.random() * len(rows))] for _ in range(args.probes)]  # known (trained) artists
    seconds = [rows[int(rng.random() * len(rows))] for _ in range(args.probes)]
    clients = [MetricsClient(w.port) for w in workers]
    load = subprocess.Popen(
        load_cmd("rate", bootstrap, topic, run, seed=2000, rate=args.load_rate, event_ids=int(args.event_ids)),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    prober = Prober(bootstrap, topic, worker.port, run, args.poll_interval, args.probe_deadline, args.settle)
    threads = [threading.Thread(target=prober.poller, daemon=True) for _ in range(args.pollers)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(args.load_warmup)  # the load reaches the worker before the first probe
        before = summed_metrics(clients)
        t_before = time.monotonic()
        cpu_before = sum(cpu_seconds(w.proc.pid) for w in workers)
        loads = [load_avg()]
        start = time.monotonic()
        for i in range(args.probes):
            delay = start + i * args.probe_interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            prober.send(i, artists[i], seconds[i] if seconds[i] != artists[i] else rows[(i * 7919) % len(rows)])
            if i % 200 == 199:
                loads.append(load_avg())
        limit = args.probes * args.probe_interval + 2 * args.probe_deadline + args.settle
        while not (len(prober.latency) >= args.probes and prober.done()) and time.monotonic() - start < limit:
            time.sleep(0.05)
        after = summed_metrics(clients)
        t_after = time.monotonic()
        cpu_after = sum(cpu_seconds(w.proc.pid) for w in workers)
    finally:
        prober.close()
        out, _ = load.communicate(timeout=60)  # closes its stdin: the load producer stops
    latencies = [prober.latency.get(i) for i in range(args.probes)]
    existing = [prober.latency_existing.get(i) for i in range(args.probes)]
    load_result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    processed = after.get("playrec_events_processed_total", 0) - before.get("playrec_events_processed_total", 0)
    batches = after.get("playrec_batch_seconds_count", 0) - before.get("playrec_batch_seconds_count", 0)
    batch_s = after.get("playrec_batch_seconds_sum", 0) - before.get("playrec_batch_seconds_sum", 0)
    return {
        "probes": len(latencies),
        **latency_summary(latencies),
        "existing": latency_summary(existing),
        "produce_ack": latency_summary(list(prober.acked)),
        "latencies": latencies,  # per probe, in send order (None = lost)
        "latencies_existing": existing,
        "mean_polls": prober.polls / max(1, len(latencies)),
        "probe_seconds": t_after - t_before,
        "load": load_result,
        "workers": len(workers),
        "worker_rate_during_probes": processed / (t_after - t_before),
        "worker_cpu_share": (cpu_after - cpu_before) / (t_after - t_before),
        "worker_mean_batch_s": batch_s / batches if batches else float("nan"),
        "worker_mean_batch_events": (
            (after.get("playrec_batch_events_sum", 0) - before.get("playrec_batch_events_sum", 0)) / batches
            if batches
            else float("nan")
        ),
        "fold_ins": after.get("playrec_fold_in_seconds_count", 0) - before.get("playrec_fold_in_seconds_count", 0),
        "fold_in_seconds": after.get("playrec_fold_in_seconds_sum", 0) - before.get("playrec_fold_in_seconds_sum", 0),
        "lag_after": after.get("playrec_consumer_lag", float("nan")),
        "requests": after.get("playrec_request_seconds_count", 0) - before.get("playrec_request_seconds_count", 0),
        "request_seconds": after.get("playrec_request_seconds_sum", 0) - before.get("playrec_request_seconds_sum", 0),
        "load_averages": loads,
    }


# ------------------------------------------------------------------------------------------ report
def markdown(result: dict[str, Any]) -> str:
    t, f = result["throughput"], result["freshness"]
    p = result["produce"]
    lines = [
        f"Run {result['date']} — `{result['command']}`",
        "",
        f"Machine: {result['machine']}; broker: {result['broker']}; code: {result['git']}.",
        f"`uptime` before: `{result['uptime_before']}`; after: `{result['uptime_after']}`.",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| pre-produce ({p['events']:,} events, {len(p['per_process'])} processes) | {p['rate']:,.0f} events/s | |",
        f"| worker start -> first event processed | {t['wait_first_event_s']:.1f} s | |",
        f"| **sustained** (median of {result['window']:.0f}-s windows, {len(t['window_rates'])} windows) "
        f"| **{t['sustained_rate']:,.0f} events/s** | >= {TARGET_SUSTAINED:,.0f} "
        f"{'(met)' if t['sustained_rate'] >= TARGET_SUSTAINED else '(missed)'} |",
        f"| overall (first to last event, {t['seconds']:.1f} s) | {t['overall_rate']:,.0f} events/s | |",
        f"| batches: count / mean events / mean seconds | {t['batch_count']:,.0f} / "
        f"{t['batch_events_sum'] / max(1, t['batch_count']):,.0f} / "
        f"{t['batch_seconds_sum'] / max(1, t['batch_count']):.3f} s (sum {t['batch_seconds_sum']:.1f} s) | |",
        f"| worker CPU while consuming: share of one core / events per CPU-second | "
        f"{t['worker_cpu_share']:.0%} / {t['events_per_cpu_s']:,.0f} | |",
        f"| events per worker CPU-second: first / median / last {result['window']:.0f}-s window | "
        + (
            f"{t['events_per_cpu_s_windows'][0]:,} / {statistics.median(t['events_per_cpu_s_windows']):,.0f} / "
            f"{t['events_per_cpu_s_windows'][-1]:,} | |"
            if t["events_per_cpu_s_windows"]
            else "– | |"
        ),
        f"| load average during phase 1 (every 10 s) | {'; '.join(t['load_averages'])} | |",
    ]
    if f:
        load, e = f["load"], f["existing"]
        lines += [
            f"| background load: target / achieved | {args_rate(result):,.0f} / {load.get('rate', float('nan')):,.0f}"
            f" events/s ({load.get('events', 0):,} events) | |",
            f"| events/s processed during probes ({f.get('workers', 1)} worker(s)) | "
            f"{f['worker_rate_during_probes']:,.0f} "
            f"(batches of {f['worker_mean_batch_events']:,.0f} events, {f['worker_mean_batch_s'] * 1000:.0f} ms; "
            f"worker CPU {f['worker_cpu_share']:.0%} of a core) | |",
            f"| new users: freshness p50 / p90 | {f['p50'] * 1000:,.0f} / {f['p90'] * 1000:,.0f} ms | |",
            f"| **new users: freshness p99** / max ({f['answered']}/{f['probes']} probes answered) | "
            f"**{f['p99'] * 1000:,.0f} ms** / {f['max'] * 1000:,.0f} ms | <= {TARGET_P99_S * 1000:,.0f} ms "
            f"{'(met)' if f['p99'] <= TARGET_P99_S and not f['timeouts'] else '(missed)'} |",
            f"| existing users (second play, fold-in): p50 / p90 | {e['p50'] * 1000:,.0f} / {e['p90'] * 1000:,.0f} ms"
            " | |",
            f"| **existing users: freshness p99** / max ({e['answered']}/{f['probes']} answered) | "
            f"**{e['p99'] * 1000:,.0f} ms** / {e['max'] * 1000:,.0f} ms | <= {TARGET_P99_S * 1000:,.0f} ms "
            f"{'(met)' if e['p99'] <= TARGET_P99_S and not e['timeouts'] else '(missed)'} |",
            f"| background fold-ins (durable vectors): count / mean duration | {f['fold_ins']:,.0f} / "
            f"{f['fold_in_seconds'] / max(1, f['fold_ins']):.2f} s | |",
            f"| probe plays, send -> broker ack: p50 / p99 / max | {f['produce_ack']['p50'] * 1000:,.0f} / "
            f"{f['produce_ack']['p99'] * 1000:,.0f} / {f['produce_ack']['max'] * 1000:,.0f} ms | |",
            f"| polls per probe (mean) / worker time answering them | {f['mean_polls']:.1f} / "
            f"{f['request_seconds']:.2f} s for {f['requests']:,.0f} requests "
            f"({1000 * f['request_seconds'] / max(1, f['requests']):.2f} ms each) | |",
            f"| load average during phase 2 | {'; '.join(f['load_averages'])} | |",
        ]
    return "\n".join(lines)


def args_rate(result: dict[str, Any]) -> float:
    return float(result["args"]["load_rate"])


def machine() -> str:
    cpus = os.cpu_count()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{cpus} vCPUs ({model or platform.processor()}), Python {platform.python_version()}, {platform.system()}"


# -------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace, bootstrap: str, broker_note: str, tmp: Path) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    prefix = f"stb-{run_id}-"
    topic = prefix + "plays"
    store = args.store or train_store(tmp / "store", LASTFM)
    create_topic(bootstrap, topic, args.partitions)
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "benchmarks/stream_throughput.py", *args.argv]
        ),
        "machine": machine(),
        "broker": broker_note,
        "git": git_state(),
        "uptime_before": uptime(),
        "window": args.window,
        "args": {k: v for k, v in vars(args).items() if k != "argv" and not isinstance(v, Path)},
    }
    print(f"run {run_id}: producing {args.events:,} events to {topic} ...", flush=True)
    result["produce"] = produce_bulk(
        bootstrap, topic, run_id, args.events, args.producers, args.partitions, args.event_ids
    )
    print(f"  {result['produce']['rate']:,.0f} events/s in {result['produce']['seconds']:.1f} s", flush=True)

    worker = WorkerProcess(
        bootstrap, store, prefix, f"stb-{run_id}", tmp / "worker", partitions=args.partitions, loglevel="warn"
    )
    spy: subprocess.Popen | None = None
    extra: list[WorkerProcess] = []
    try:
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            spy = start_spy(worker.proc.pid, args.profile / f"throughput-{run_id}.txt")
        print(f"worker on port {worker.port}; consuming ...", flush=True)
        result["throughput"] = t = measure_throughput(worker, args.events, args.deadline, args.window)
        stop_spy(spy)
        print(
            f"  sustained {t['sustained_rate']:,.0f} events/s, overall {t['overall_rate']:,.0f} events/s "
            f"({t['seconds']:.1f} s, windows {t['window_rates']})",
            flush=True,
        )
        wait_for(worker.ready, 60, "worker ready")
        for n in range(1, args.freshness_workers):  # scale out before the load: same app, group and tables
            extra.append(
                WorkerProcess(
                    bootstrap,
                    store,
                    prefix,
                    f"stb-{run_id}",
                    tmp / f"worker{n}",
                    partitions=args.partitions,
                    loglevel="warn",
                )
            )
        for w in extra:
            wait_for(w.ready, 120, "added worker ready")
        if extra:
            wait_for(lambda: all(w.ready() for w in [worker, *extra]), 120, "all workers ready after the rebalance")
        if args.probes:
            if args.profile:
                spy = start_spy(worker.proc.pid, args.profile / f"freshness-{run_id}.txt")
            workers = len(extra) + 1
            print(
                f"freshness: {args.probes} probes under {args.load_rate:,.0f} events/s, {workers} worker(s) ...",
                flush=True,
            )
            result["freshness"] = measure_freshness(bootstrap, topic, [worker, *extra], run_id, args)
            stop_spy(spy)
        else:
            result["freshness"] = {}
    finally:
        stop_spy(spy)
        for w in extra:
            w.stop()
        worker.stop()
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for w in (worker, *extra):
                shutil.copy(w.log_path, args.logs / f"{run_id}-{w.log_path.name}")
    result["uptime_after"] = uptime()
    return result


def start_spy(pid: int, out: Path) -> subprocess.Popen:
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "-f", "raw", "-r", "50", "-o", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_spy(spy: subprocess.Popen | None) -> None:
    if spy is not None and spy.poll() is None:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=None, help="events to pre-produce (default 1,000,000)")
    parser.add_argument("--probes", type=int, default=None, help="freshness probes (default 1000; 0 = skip)")
    parser.add_argument("--quick", action="store_true", help="--events 200000 --probes 200")
    parser.add_argument("--load-rate", type=float, default=20_000.0, help="background events/s during probes")
    parser.add_argument("--store", type=Path, default=None, help="model store to reuse (default: train Last.fm 2K)")
    parser.add_argument("--producers", type=int, default=2, help="pre-produce processes (default 2)")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per sustained-rate window (default 5)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds to consume all events")
    parser.add_argument("--probe-interval", type=float, default=0.1, help="seconds between probes (default 0.1)")
    parser.add_argument(
        "--poll-interval", type=float, default=0.05, help="seconds between polls of one probe (default 0.05)"
    )
    parser.add_argument("--pollers", type=int, default=4, help="polling threads (default 4)")
    parser.add_argument(
        "--freshness-workers", type=int, default=1, help="workers sharing the partitions during the probes (default 1)"
    )
    parser.add_argument("--probe-deadline", type=float, default=30.0, help="seconds before a probe counts as lost")
    parser.add_argument(
        "--settle", type=float, default=2.5, help="seconds between a probe's first answer and its second play"
    )
    parser.add_argument("--load-warmup", type=float, default=3.0, help="seconds of load before the first probe")
    parser.add_argument("--profile", type=Path, default=None, help="write py-spy raw profiles of the worker here")
    parser.add_argument(
        "--event-ids", action="store_true", help="every event carries a unique event_id (de-duplication on)"
    )
    parser.add_argument("--logs", type=Path, default=None, help="copy the workers' logs into this directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the full result as JSON")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.events is None:
        args.events = 200_000 if args.quick else 1_000_000
    if args.probes is None:
        args.probes = 200 if args.quick else 1000
    if args.deadline is None:
        args.deadline = max(180.0, args.events / 2000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="stream-throughput-") as tmp:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP")
        if bootstrap:
            result = run(args, bootstrap, f"KAFKA_BOOTSTRAP={bootstrap}", Path(tmp))
        else:
            from playrec.devbroker import KAFKA_VERSION, DevBroker

            with DevBroker() as broker:
                address = broker.bootstrap
                result = run(args, address, f"DevBroker (Kafka {KAFKA_VERSION}, KRaft, same machine)", Path(tmp))
    print()
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    t, f = result["throughput"], result["freshness"]
    fresh = not f or all(x["p99"] <= TARGET_P99_S and not x["timeouts"] for x in (f, f["existing"]))
    ok = t["sustained_rate"] >= TARGET_SUSTAINED and fresh
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
