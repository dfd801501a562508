"""One history on the real broker (issue #19): a file-trained deployment's retrains learn from the
file's history + everything the workers streamed, judged on every user, each play counted once.

The tests of this module share one stream (worker, topic prefix, model store) and run in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from kafka import KafkaProducer

from batch.history import history_arrays
from batch.model_store import Model, ModelStore
from batch.plays import read_play_counts
from playrec.cli import main
from stream.events import encode_play

from .test_real_data import LASTFM, require
from .test_spark import require_spark
from .workers import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.integration

MODEL_FLAGS = ["--factors", "16", "--iterations", "6", "--no-index", "--no-progress"]
NOW_MS = int(time.time() * 1000)


@pytest.fixture(scope="module")
def env(kafka_bootstrap, tmp_path_factory):
    root = tmp_path_factory.mktemp("one-history")
    prefix = f"oh-{uuid.uuid4().hex[:8]}-"
    file_counts = read_play_counts(require(LASTFM))
    assert main(["train", "--plays", str(LASTFM), "--out", str(root / "store"), "--holdout", "0", *MODEL_FLAGS]) == 0
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5, acks="all")
    state = {
        "root": root,
        "store": ModelStore(root / "store"),
        "prefix": prefix,
        "app": prefix + "app",
        "bootstrap": kafka_bootstrap,
        "producer": producer,
        "file": pairs(file_counts.matrix, file_counts.user_ids, file_counts.item_ids),
        "file_counts": file_counts,
        "streamed": {},
        "workers": [],
    }
    state["worker"] = start_worker(state)
    yield state
    producer.close()
    for worker in state["workers"]:
        worker.stop()


def start_worker(env) -> WorkerProcess:
    worker = WorkerProcess(
        env["bootstrap"], env["store"].root, env["prefix"], env["app"], env["root"] / "w", session_timeout=6
    )
    env["workers"].append(worker)
    worker.wait_ready()
    return worker


def pairs(matrix, user_ids, item_ids) -> dict[tuple[str, str], float]:
    m = matrix.tocoo()
    return {(str(user_ids[r]), str(item_ids[c])): float(v) for r, c, v in zip(m.row, m.col, m.data)}


def model_counts(model: Model, history: bool = False) -> dict[tuple[str, str], float]:
    """The version's training counts (or its history) as {(user, track): streams}."""
    if history:
        arrays = history_arrays(model)
        if arrays is None:
            return {}
    else:
        arrays = tuple(np.load(model.artifact(f"plays_{n}.npy")) for n in ("indptr", "indices", "counts"))
    indptr, indices, counts = (np.asarray(a) for a in arrays)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return {(str(model.user_ids[r]), str(model.item_ids[c])): float(v) for r, c, v in zip(rows, indices, counts)}


def stream(env, plays: list[tuple[str, str]]) -> None:
    """Produce the plays and wait until the worker counts all of them (so the changelog holds them)."""
    streamed = env["streamed"]
    for user, track in plays:
        key, value = encode_play(user, track, NOW_MS, 200_000, uuid.uuid4().hex)
        env["producer"].send(env["prefix"] + "plays", key=key, value=value)
        streamed.setdefault(user, {})
        streamed[user][track] = streamed[user].get(track, 0) + 1
    env["producer"].flush()
    worker = env["worker"]
    for user in {u for u, _ in plays}:
        expected = dict(streamed[user])
        wait_for(lambda u=user, e=expected: worker.get(f"/users/{u}/plays")["plays"] == e, 60, f"{user}'s counts")


def expected_total(env, with_file: bool = True) -> dict[tuple[str, str], float]:
    """A from-scratch count: the file's pairs plus every play streamed so far."""
    total = dict(env["file"]) if with_file else {}
    for user, tracks in env["streamed"].items():
        for track, n in tracks.items():
            total[(user, track)] = total.get((user, track), 0.0) + n
    return total


def retrain(env, store: ModelStore, *extra: str) -> str:
    args = ["retrain", "--once", "--from-kafka", env["bootstrap"], "--app-id", env["app"], "--out", str(store.root)]
    assert main([*args, *MODEL_FLAGS, *extra]) == 0
    return store.current_version()


def first_plays(env) -> list[tuple[str, str]]:
    """30 brand-new listeners replaying file users' favourite artists; 50 known users streaming more."""
    counts = env["file_counts"]
    m, users, items = counts.matrix, counts.user_ids, counts.item_ids
    plays = []
    for i in range(30):
        row = m[100 + i]
        top = row.indices[np.argsort(-row.data)[:4]]
        plays += [(f"listener-{i}", str(items[c])) for c in top]
    for i in range(50):
        row = m[i]
        plays += [(str(users[i]), str(items[c])) for c in row.indices[:2]]
        plays.append((str(users[i]), f"new-track-{i % 5}"))
    return plays


def test_the_retrain_learns_from_the_file_and_the_stream(env, capsys):
    """The issue's flow: the published model holds all 1,922 users and file + streamed counts."""
    store = env["store"]
    file_version = store.current_version()
    stream(env, first_plays(env))
    capsys.readouterr()
    version = retrain(env, store)
    out = capsys.readouterr().out
    assert version != file_version and "passes the gate" in out, out
    model = store.load()
    assert len(model.user_ids) == 1922
    trained = model_counts(model)
    assert trained == expected_total(env)
    known = str(env["file_counts"].user_ids[0])
    file_row = {t: v for (u, t), v in env["file"].items() if u == known}
    row = {t: v for (u, t), v in trained.items() if u == known}
    streamed = env["streamed"][known]
    assert row == {t: file_row.get(t, 0.0) + streamed.get(t, 0) for t in {*file_row, *streamed}}
    assert row != file_row  # the stream did add to it
    assert model_counts(model, history=True) == env["file"]  # the history stays the file's
    manifest = model.manifest
    assert manifest["input"]["source"] == "history+stream" and manifest["history"]["from_version"] == file_version
    assert manifest["history"]["origin"]["input"]["source"] == "file"
    assert [e["version"] for e in manifest["lineage"]] == [file_version]
    report = (model.path / "report.json").read_text()
    assert "live lineage replayed without the held-out plays" in report
    assert '"users": ' in report


def test_a_second_retrain_counts_no_play_twice(env):
    store = env["store"]
    before = store.current_version()
    plays = [(f"listener-{i}", "new-track-1") for i in range(10)]
    plays += [(str(env["file_counts"].user_ids[i]), "new-track-2") for i in range(10)]
    stream(env, plays)
    version = retrain(env, store, "--tune")  # the live model was not tuned: the full grid
    assert version != before
    model = store.load()
    tuning = model.manifest["training"]["tuning"]
    assert tuning["warm_start"] is None and tuning["candidates"] >= 2 and tuning["trials"]
    assert {k: model.manifest["parameters"][k] for k in tuning["choice"]} == tuning["choice"]
    report = json.loads((model.path / "report.json").read_text())
    assert report["tuning"]["choice"] == tuning["choice"] and "tune_s" in report["timings"]
    assert model_counts(model) == expected_total(env)  # from scratch: file + all that streamed, once
    assert model_counts(model, history=True) == env["file"]
    assert [e["version"] for e in model.manifest["lineage"]][-1] == before


def test_a_spark_retrain_merges_the_same_history(env):
    """`retrain --engine spark`: the merge is the same (numpy, before training), Spark trains on it."""
    require_spark()
    store = env["store"]
    before = store.current_version()
    stream(env, [(f"spark-{i}", "new-track-3") for i in range(5)] + [("listener-7", "new-track-3")])
    version = retrain(env, store, "--engine", "spark", "--spark-master", "local[2]")
    assert version != before
    model = store.load()
    assert model.manifest["training"]["engine"] == "spark"
    assert model_counts(model) == expected_total(env) and model_counts(model, history=True) == env["file"]
    assert len(model.user_ids) >= 1922 + 5 and np.isfinite(model.user_factors).all()


def test_a_stream_lineage_and_a_worker_restart(env, tmp_path):
    """A lineage begun by `train --from-kafka` has no history; restarting the worker changes no input."""
    streamed_store = ModelStore(tmp_path / "streamed")
    flags = ["--from-kafka", env["bootstrap"], "--app-id", env["app"], "--holdout", "0", *MODEL_FLAGS]
    assert main(["train", "--out", str(streamed_store.root), *flags]) == 0
    first = streamed_store.load()
    assert first.manifest["history"]["arrays"] is None and model_counts(first) == expected_total(env, with_file=False)
    env["worker"].stop()
    env["worker"] = start_worker(env)  # a fresh process restores its tables from the changelog
    stream(env, [("listener-3", "new-track-4"), (str(env["file_counts"].user_ids[5]), "new-track-4")])
    retrain(env, streamed_store, "--tolerance", "0.5")
    assert model_counts(streamed_store.load()) == expected_total(env, with_file=False)
    retrain(env, env["store"])
    assert model_counts(env["store"].load()) == expected_total(env)


def test_retrain_every_publishes_each_cycle_and_keeps_every_user(env):
    store = env["store"]
    versions = [store.current_version()]
    cmd = [sys.executable, "-m", "playrec.cli", "retrain", "--every", "1s", "--from-kafka", env["bootstrap"]]
    cmd += ["--app-id", env["app"], "--out", str(store.root), "--keep", "10", *MODEL_FLAGS]
    log = (env["root"] / "every.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        for cycle in range(3):
            version = wait_for(lambda: (v := store.current_version()) != versions[-1] and v, 180, f"cycle {cycle}")
            versions.append(version)
            stream(env, [(f"every-{cycle}", "new-track-0"), (f"listener-{cycle}", f"every-track-{cycle}")])
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    text = (env["root"] / "every.log").read_text()
    assert "kept the live model" not in text and "cycle failed" not in text, text[-3000:]
    users = [store.read_manifest(v)["rows"]["users"] for v in versions]
    assert users == sorted(users) and users[0] >= 1922, users
    final = retrain(env, store)  # after the last plays: still exactly the from-scratch count
    assert model_counts(store.load(final)) == expected_total(env)
