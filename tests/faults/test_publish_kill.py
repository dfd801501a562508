"""`playrec train` killed with SIGKILL at random points while readers load the live model: every
load sees a complete, checksum-verified version (the old one or the new one, never a mix), every
listed version verifies, and the next run publishes normally."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from batch.model_store import ModelStore

from ..integration.workers import ROOT, wait_for
from ..unit.synthetic import random_plays


def write_plays(path, n_users: int = 25_000, n_tracks: int = 8_000) -> None:
    plays = random_plays(n_users, n_tracks, 0.003, seed=9).tocoo()
    lines = (f"u{u}\tt{t}\t{int(c)}" for u, t, c in zip(plays.row, plays.col, plays.data))
    path.write_text("\n".join(lines) + "\n")


class Reader(threading.Thread):
    """Loads CURRENT over and over, as a serving process would, and records what it saw."""

    def __init__(self, store: ModelStore) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.loads = 0
        self.versions: set[str] = set()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                model = self.store.load()  # verifies every checksum and the array shapes
                rows = model.manifest["rows"]
                assert (len(model.user_ids), len(model.item_ids)) == (rows["users"], rows["items"])
                assert np.isfinite(np.asarray(model.item_factors)).all()
                self.versions.add(model.version)
                self.loads += 1
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")


def test_train_killed_at_random_points_never_exposes_a_partial_model(tmp_path):
    plays = tmp_path / "plays.tsv"
    write_plays(plays)
    store = ModelStore(tmp_path / "store")
    cmd = [sys.executable, "-m", "playrec.cli", "train", "--plays", str(plays), "--out", str(store.root)]
    cmd += ["--factors", "32", "--iterations", "8", "--trees", "10", "--keep", "50", "--no-progress", "--holdout", "0"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    reader = Reader(store)
    reader.start()
    started = time.monotonic()  # a full run's length with the reader busy, to spread the kills over
    subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300, check=True)
    full_run_s = time.monotonic() - started
    rng = random.Random(4)
    # four kills at random times spread over a run, then two while the publish itself is under way:
    # as soon as the staging directory appears, and once its manifest (written last) exists
    plan = [("time", full_run_s * 1.2 * (i + rng.random()) / 4) for i in range(4)]
    plan += [("staging", ".tmp-*"), ("staging", ".tmp-*/manifest.json")]
    outcomes = []
    try:
        for kind, when in plan:
            before = store.current_version()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kind == "time":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(when)
            else:
                wait_for(lambda p=proc, w=when: p.poll() is not None or any(store.models.glob(w)), 120, when, 0.001)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            after = store.current_version()
            outcomes.append((kind, when if kind == "staging" else round(when, 1), proc.returncode, after != before))
            assert after == before or after > before
            for version in store.versions():
                store.verify(version)  # no listed version is partial
    finally:
        reader.stop.set()
        reader.join(30)
    assert not reader.errors, reader.errors[:3]
    assert reader.loads > 0
    finished = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    store.verify(store.current_version())
    print(
        f"\npublish under kill -9: full run {full_run_s:.1f} s; (delay s, exit, new CURRENT) {outcomes}; "
        f"a reader loaded CURRENT {reader.loads} times ({len(reader.versions)} versions), 0 errors"
    )
