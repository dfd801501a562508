"""Run `playrec worker` processes for integration tests and talk to them over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], deadline_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `condition` until it returns a truthy value or the deadline passes (then fail)."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < end:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what} (last: {last!r})")


def read_topic(bootstrap: str, topic: str, expected: int, deadline_s: float) -> list:
    """Records of `topic`, read from the start of every partition until at least `expected` arrived
    (fails after `deadline_s`)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = wait_for(lambda: consumer.partitions_for_topic(topic), 30, f"topic {topic}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list = []

        def collect():
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            return len(records) >= expected

        wait_for(collect, deadline_s, f"{expected} records of {topic}", interval_s=0)
        return records
    finally:
        consumer.close()


class WorkerProcess:
    """One `playrec worker` subprocess with its own port and state directory."""

    def __init__(
        self,
        bootstrap: str,
        store: Path,
        prefix: str,
        app_id: str,
        state: Path,
        table_store: str | None = "memory://",
        data_dir: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        default_data_dir: bool = False,
        **flags: Any,
    ) -> None:
        """`table_store` None: the store `playrec worker` picks by default; `data_dir` None: a fresh
        directory under `state`, or with `default_data_dir` none at all (the worker's default)."""
        self.port = port or free_port()
        self.log_path = state / f"worker-{self.port}-{time.monotonic_ns()}.log"
        state.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if data_dir is None and not default_data_dir:
            data_dir = state / f"data-{self.port}"
        args = [
            sys.executable,
            "-m",
            "playrec.cli",
            "worker",
            "--store",
            str(store),
            "--bootstrap",
            bootstrap,
            "--port",
            str(self.port),
            "--topic-prefix",
            prefix,
            "--app-id",
            app_id,
        ]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        if table_store is not None:
            args += ["--table-store", table_store]
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(
        self, path: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        req = urllib.request.Request(self.url(path), data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                raw, status = response.read(), response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def get(self, path: str) -> Any:
        status, body = self.request(path)
        assert status == 200, f"GET {path} -> {status}: {body}"
        return body

    def ready(self) -> dict | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}; log:\n{self.tail()}")
        status, body = self.request("/ready")
        return body if status == 200 else None

    def wait_ready(self, deadline_s: float = 90) -> dict:
        return wait_for(self.ready, deadline_s, f"worker on port {self.port} to be ready")

    def metric(self, name: str) -> float:
        status, text = self.request("/metrics")
        if status != 200:
            return 0.0
        total = 0.0
        for line in str(text).splitlines():
            if line.startswith(name) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head == name or head.startswith(name + "{"):
                    total += float(value)
        return total

    def tail(self, lines: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, deadline_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(deadline_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
