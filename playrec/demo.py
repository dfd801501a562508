"""`playrec demo`: the whole loop on one machine.

1. start a local Apache Kafka broker (or use KAFKA_BOOTSTRAP),
2. train on Last.fm 2K, print the holdout evaluation against popularity,
3. start a stream worker on the model,
4. replay Last.fm plays as background load,
5. stream a new listener's first plays and print their recommendations as they change,
6. let a brand-new artist gather listeners and show it becoming recommendable.

The worker's operator console (docs/CONSOLE.md) is at the URL printed once it is ready; `--hold` keeps
the broker and the worker running after the script, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.plays import read_play_counts
from batch.training import train_and_publish

log = logging.getLogger(__name__)

DEFAULT_DATA = Path("../shared/data")


class DemoError(RuntimeError):
    """The demo cannot run (data or broker missing, worker failed)."""


def find_lastfm(data: Path | None) -> Path:
    """Locate Last.fm 2K's user_artists.dat under --data, $PLAYREC_DATA or ../shared/data."""
    roots = [data] if data else [Path(p) for p in filter(None, [os.environ.get("PLAYREC_DATA")])] + [DEFAULT_DATA]
    for root in roots:
        for candidate in (root / "lastfm-2k" / "user_artists.dat", root / "user_artists.dat"):
            if candidate.is_file():
                return candidate
    raise DemoError(
        "cannot find lastfm-2k/user_artists.dat under "
        + ", ".join(str(r) for r in roots)
        + ": pass --data DIR or set PLAYREC_DATA to the folder holding lastfm-2k/"
    )


def artist_names(user_artists: Path) -> dict[str, str]:
    """Artist id -> name from artists.dat next to user_artists.dat (empty if absent)."""
    path = user_artists.with_name("artists.dat")
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows, None)
        return {row[0]: row[1] for row in rows if len(row) >= 2}


@contextlib.contextmanager
def broker() -> Iterator[str]:
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    from playrec.devbroker import DevBroker

    with DevBroker() as dev:
        yield dev.bootstrap


def http_json(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


def wait_until(check, deadline_s: float, what: str, interval_s: float = 0.1):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(interval_s)
    raise DemoError(f"timed out after {deadline_s:.0f} s waiting for {what}")


def run(args: argparse.Namespace) -> int:
    path = find_lastfm(args.data)
    names = artist_names(path)

    def label(track: str) -> str:
        return names.get(track, track)

    counts = read_play_counts(path)
    print(f"== Last.fm 2K: {counts.shape[0]:,} users x {counts.shape[1]:,} artists, {counts.nnz:,} play counts")
    store = ModelStore(args.store)
    report = train_and_publish(
        counts, store, AlsParams(iterations=args.iterations), holdout=0.2, source={"path": str(path)}
    )
    print(f"holdout 20%:  {report.metrics.describe()}")
    print(f"popularity:   {report.baseline.describe()}")
    print(f"published model {report.version} ({report.seconds_per_iteration:.3f} s per ALS iteration)")
    from playrec import api

    model = api.ModelStore(args.store).load()
    fan = str(counts.user_ids[0])
    plays = model.serving.user_plays(fan)
    favourites = sorted(plays, key=lambda t: -plays[t])
    print(f"\nuser {fan} listens most to: " + ", ".join(label(t) for t in favourites[:5]))
    print(f"batch model recommends for user {fan}: " + ", ".join(label(r.track) for r in model.recommend(fan, 5)))

    with broker() as bootstrap:
        print(f"\n== Kafka broker at {bootstrap}")
        run_id = uuid.uuid4().hex[:6]
        prefix, port = f"demo-{run_id}-", args.port
        worker_log = Path(args.store).parent / f"worker-{run_id}.log"
        with worker_log.open("w") as log_file:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "playrec.cli",
                    "worker",
                    "--store",
                    str(args.store),
                    "--bootstrap",
                    bootstrap,
                    "--port",
                    str(port),
                    "--topic-prefix",
                    prefix,
                    "--app-id",
                    f"{prefix}app",
                    "--table-store",
                    "memory://",
                    "--data-dir",
                    str(Path(args.store).parent / f"state-{run_id}"),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                code = _stream(bootstrap, prefix, port, worker, worker_log, favourites, label, path)
                if getattr(args, "hold", False) and code == 0:
                    _hold(port, worker)
                else:
                    print("stopping the worker and the broker")
                return code
            finally:
                worker.terminate()
                worker.wait(30)


def _hold(port: int, worker: subprocess.Popen) -> None:
    """Keep the broker and the worker up (for the console) until Ctrl-C or the worker exits."""
    print(f"\nholding: the operator console stays at http://127.0.0.1:{port}/console; Ctrl-C stops")
    try:
        while worker.poll() is None:
            try:
                worker.wait(3600)
            except subprocess.TimeoutExpired:
                continue
        print(f"the worker exited ({worker.returncode})")
    except KeyboardInterrupt:
        print("\nstopping the worker and the broker")


def _stream(bootstrap, prefix, port, worker, worker_log, favourites, label, path) -> int:
    from kafka import KafkaProducer

    from stream.events import encode_play
    from stream.replay import run_replay

    base = f"http://127.0.0.1:{port}"
    logging.getLogger("kafka").setLevel(logging.ERROR)  # kafka-python warns about its own slow polls

    def ready():
        if worker.poll() is not None:
            raise DemoError(f"the worker exited ({worker.returncode}); see {worker_log}")
        return http_json(base + "/ready")[0] == 200

    wait_until(ready, 120, "the stream worker")
    print(f"stream worker ready on {base} (log: {worker_log})")
    print(f"operator console: {base}/console  (live charts, the model, a user lookup; `--hold` keeps it up)")
    load = threading.Thread(
        target=run_replay,
        kwargs={
            "bootstrap": bootstrap,
            "path": path,
            "rate": 5000,
            "limit": 50_000,
            "topic": prefix + "plays",
            "show_progress": False,
        },
        daemon=True,
    )
    load.start()
    print("replaying 50,000 Last.fm plays at 5,000/s in the background")
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    listener = f"demo-listener-{prefix[5:11]}"

    def recommendations() -> dict:
        return http_json(f"{base}/users/{listener}/recommendations?k=5")[1]

    def show(title: str) -> None:
        body = recommendations()
        items = ", ".join(label(i["track"]) for i in body.get("items", []))
        print(f"  [{body.get('source', '?'):10s}] {title}: {items}")

    print(f"\n== a new listener, {listener}, streams their first plays")
    show("before any play")
    for n, track in enumerate(favourites[:6], 1):
        sent = time.monotonic()
        key, value = encode_play(listener, track, int(time.time() * 1000), 200_000)
        producer.send(prefix + "plays", key=key, value=value)
        producer.flush()
        wait_until(
            lambda t=track: t in http_json(f"{base}/users/{listener}/plays")[1].get("plays", {}),
            30,
            "the play to be counted",
        )
        show(f"after {n} play{'s' if n > 1 else ''} (+{label(track)}, {1000 * (time.monotonic() - sent):.0f} ms)")

    print("\n== a brand-new artist gathers listeners")
    new_artist = f"new-release-{prefix[5:11]}"
    for i in range(5):
        key, value = encode_play(
            f"early-adopter-{i}-{prefix[5:11]}", favourites[i % 3], int(time.time() * 1000), 200_000
        )
        producer.send(prefix + "plays", key=key, value=value)
        key, value = encode_play(f"early-adopter-{i}-{prefix[5:11]}", new_artist, int(time.time() * 1000), 200_000)
        producer.send(prefix + "plays", key=key, value=value)
    producer.flush()
    wait_until(lambda: http_json(f"{base}/tracks/{new_artist}/similar?k=3")[0] == 200, 60, "the new artist's vector")
    similar = http_json(f"{base}/tracks/{new_artist}/similar?k=3")[1]["items"]
    print(f"  {new_artist} is now searchable; closest artists: " + ", ".join(label(i["track"]) for i in similar))
    load.join(60)
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    processed = next(
        line.split()[-1] for line in metrics.splitlines() if line.startswith("playrec_events_processed_total")
    )
    print(f"\nthe worker applied {float(processed):,.0f} play events")
    producer.close()
    return 0
