"""Take-over soak: kill -9 one of two workers again and again under a steady replay.

Each cycle kills a worker chosen by the seeded rng and either restarts it at once (the take-over and
the rejoin overlap: two rebalances while recovery runs) or only after the survivor took over all
partitions. Both phases have a deadline (default 30 s); a worker that misses it gets `kill -USR1`
(stream/diagnostics.py) and its state dump and log tail are put in the failure. At the end every
user's counts (HTTP, then the changelog) must equal the replayed input exactly.

Used by tests/faults/test_takeover_soak.py (5 cycles) and benchmarks/soak.py (50+).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batch.plays import MIN_MS_PLAYED
from stream.events import encode_play

from ..integration.workers import WorkerProcess, wait_for
from .harness import (
    N_MODEL_USERS,
    N_TRACKS,
    PARTITIONS,
    counts_over_http,
    difference,
    publish_model,
    replay_producer,
    unique_names,
    wait_for_durable_counts,
    wait_for_exact_counts,
)

#: seconds a worker may take to be ready again (the soak's bound, issue #13 section 3)
RECOVER_DEADLINE_S = 30.0
SESSION_TIMEOUT_S = 6
#: how a cycle restarts the killed worker: right after the kill; 0-2 s into the survivor's take-over
#: (a second rebalance while it restores the taken-over partitions); once the survivor holds them all
MODES = ("at once", "during take-over", "after take-over")


class RecoveryTimeoutError(AssertionError):
    """A worker did not recover within the deadline; the message holds its state dump and log tail."""


@dataclass
class SteadyReplay:
    """Produce seeded random plays at `rate`/s until stopped, keeping the counts they must produce."""

    bootstrap: str
    topic: str
    rate: float
    seed: int
    n_users: int = 2000
    sent: int = 0
    expected: dict[str, dict[str, int]] = field(default_factory=dict)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> SteadyReplay:
        threading.Thread(target=self._run, daemon=True, name="steady-replay").start()
        return self

    def _play(self, rng: random.Random) -> tuple[bytes, bytes]:
        user = f"u{rng.randrange(N_MODEL_USERS)}" if rng.random() < 0.3 else f"f{rng.randrange(self.n_users)}"
        track = f"t{min(int(rng.paretovariate(0.8)), N_TRACKS + 40) - 1}"
        short = rng.random() < 0.1
        ms_played = rng.randrange(1_000, MIN_MS_PLAYED) if short else rng.randrange(MIN_MS_PLAYED, 400_000)
        if not short:
            per_user = self.expected.setdefault(user, {})
            per_user[track] = per_user.get(track, 0) + 1
        return encode_play(user, track, int(time.time() * 1000), ms_played)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        producer = replay_producer(self.bootstrap)
        try:
            started = time.monotonic()
            while not self._stop.is_set():
                delay = started + self.sent / self.rate - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)  # paces the producer; not a synchronisation
                    continue
                key, value = self._play(rng)
                producer.send(self.topic, key=key, value=value)
                self.sent += 1
            producer.flush(timeout=300)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            producer.close()
            self._done.set()

    def stop(self, deadline_s: float = 300) -> None:
        """Stop producing and wait until every play sent is acknowledged."""
        self._stop.set()
        wait_for(self._done.is_set, deadline_s, "the replay to flush")
        if self.error is not None:
            raise AssertionError(f"the replay producer failed: {self.error!r}")

    @property
    def streams(self) -> int:
        return sum(sum(c.values()) for c in self.expected.values())


@dataclass
class Cycle:
    killed: str
    mode: str  # one of MODES
    takeover_s: float | None  # kill -> the survivor ready with every partition ("after take-over" only)
    recovery_s: float  # the killed worker restarted -> both workers ready, splitting the partitions


@dataclass
class SoakResult:
    seed: int
    cycles: list[Cycle]
    events: int
    streams: int
    users: int
    settle_s: float
    durable_s: float
    lost: int
    duplicated: int

    def summary(self) -> str:
        rec = [c.recovery_s for c in self.cycles]
        tko = [c.takeover_s for c in self.cycles if c.takeover_s is not None]
        takeover = (
            f"take-over median {statistics.median(tko):.1f} s, max {max(tko):.1f} s ({len(tko)} cycles); "
            if tko
            else ""
        )
        return (
            f"soak seed {self.seed}: {len(self.cycles)} kill -9 cycles, {self.events} plays "
            f"({self.streams} streams, {self.users} users); {takeover}"
            f"recovery (restart -> both ready) median {statistics.median(rec):.1f} s, max {max(rec):.1f} s; "
            f"counts exact {self.settle_s:.1f} s after the replay (changelog {self.durable_s:.1f} s later); "
            f"lost {self.lost}, duplicated {self.duplicated}"
        )


def ready_partitions(worker: WorkerProcess) -> list[int] | None:
    ready = worker.ready()
    return None if ready is None else list(ready["partitions"])


def both_ready(a: WorkerProcess, b: WorkerProcess) -> bool:
    pa, pb = ready_partitions(a), ready_partitions(b)
    return bool(pa and pb) and sorted(pa + pb) == list(range(PARTITIONS))


def holds_all(worker: WorkerProcess) -> bool:
    return ready_partitions(worker) == list(range(PARTITIONS))


def dump(worker: WorkerProcess, name: str, deadline_s: float = 10) -> str:
    """`kill -USR1` the worker, wait for its state dump in the log; the dump and the log tail as text."""
    if worker.proc.poll() is not None:
        return f"--- worker {name} (port {worker.port}) exited {worker.proc.returncode}:\n{worker.tail(80)}"
    before = worker.log_path.read_text(errors="replace").count("state dump on signal")
    os.kill(worker.proc.pid, signal.SIGUSR1)
    with contextlib.suppress(AssertionError):  # no dump in time: the tail says what there is
        wait_for(
            lambda: worker.log_path.read_text(errors="replace").count("state dump on signal") > before,
            deadline_s,
            "the state dump",
        )
    return f"--- worker {name} (port {worker.port}, pid {worker.proc.pid}):\n{worker.tail(200)}"


def _await(cond: Callable[[], bool], what: str, workers: dict[str, WorkerProcess], deadline_s: float) -> float:
    started = time.monotonic()
    try:
        wait_for(cond, deadline_s, what)
    except AssertionError as exc:
        dumps = "\n".join(dump(w, n) for n, w in workers.items())
        raise RecoveryTimeoutError(f"{exc}\n{dumps}") from None
    return time.monotonic() - started


def run_soak(
    bootstrap: str,
    tmp: Path,
    cycles: int,
    seed: int,
    rate: float = 1000.0,
    deadline_s: float = RECOVER_DEADLINE_S,
    log: Callable[[str], None] = print,
) -> SoakResult:
    """Run `cycles` kill/take-over cycles; raises RecoveryTimeoutError or AssertionError on a failure."""
    rng = random.Random(seed)
    store = publish_model(tmp)
    prefix, app_id = unique_names()
    generation = 0

    def start(name: str) -> WorkerProcess:
        nonlocal generation
        generation += 1
        return WorkerProcess(
            bootstrap, store.root, prefix, app_id, tmp / f"{name}{generation}", session_timeout=SESSION_TIMEOUT_S
        )

    workers = {"a": start("a"), "b": start("b")}
    replay: SteadyReplay | None = None
    try:
        wait_for(lambda: both_ready(workers["a"], workers["b"]), 120, "two workers splitting the partitions")
        replay = SteadyReplay(bootstrap, prefix + "plays", rate, seed).start()
        wait_for(lambda: replay.sent >= rate * 2 or replay.error, 60, "the replay to start")
        done: list[Cycle] = []
        for n in range(cycles):
            name = rng.choice(sorted(workers))
            survivor = "b" if name == "a" else "a"
            mode = rng.choice(MODES)
            workers[name].kill()
            takeover_s = None
            if mode == "during take-over":  # rejoin while the survivor restores the taken-over partitions
                _await(
                    lambda s=survivor: workers[s].ready() is None,
                    f"worker {survivor} to rebalance",
                    workers,
                    deadline_s,
                )
                time.sleep(rng.uniform(0.0, 2.0))  # a random point of the take-over (fault injection, not a wait)
            if mode == "after take-over":
                takeover_s = _await(
                    lambda s=survivor: holds_all(workers[s]), f"worker {survivor} to take over", workers, deadline_s
                )
            workers[name] = start(name)
            recovery_s = _await(
                lambda: both_ready(workers["a"], workers["b"]), "both workers ready", workers, deadline_s
            )
            cycle = Cycle(name, mode, takeover_s, recovery_s)
            done.append(cycle)
            tko = f", take-over {takeover_s:.1f} s" if takeover_s is not None else ""
            log(f"cycle {n + 1}/{cycles}: killed {name} ({mode}){tko}, both ready {cycle.recovery_s:.1f} s")
        replay.stop()
        settle_s = wait_for_exact_counts(lambda: workers["a"], replay.expected, 180)
        lost, duplicated = difference(replay.expected, counts_over_http(workers["b"], sorted(replay.expected)))
        durable_s = wait_for_durable_counts(bootstrap, app_id, replay.expected, 60)
        return SoakResult(
            seed, done, replay.sent, replay.streams, len(replay.expected), settle_s, durable_s, lost, duplicated
        )
    finally:
        if replay is not None:
            replay._stop.set()
        for worker in workers.values():
            worker.stop()
