"""The stream workers end to end on the real broker: counting, dead letters, fold-in, new tracks,
model hot swap, plays sent again, restart recovery, two workers splitting partitions and taking over.

The tests of this module share one model store and one topic prefix and run in order.
"""

from __future__ import annotations

import random
import time
import uuid

import msgpack
import numpy as np
import pytest
from kafka import KafkaProducer

from batch.als import AlsParams
from batch.model_store import ModelStore
from batch.training import train_and_publish
from stream.announce import announce_model
from stream.events import MAX_PAYLOAD_BYTES, encode_play
from stream.live_model import LiveModel

from ..unit.synthetic import random_plays, synthetic_counts
from .workers import WorkerProcess, read_topic, wait_for

pytestmark = pytest.mark.integration

N_USERS, N_TRACKS = 150, 100
PARAMS = AlsParams(factors=8, iterations=5, seed=2)
NOW_MS = int(time.time() * 1000)


class Shared:
    """State the ordered tests of this module hand to each other."""

    expected: dict[str, dict[str, int]]
    worker: WorkerProcess
    n_valid = 0
    n_bad = 0


@pytest.fixture(scope="module")
def env(kafka_bootstrap, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    store = ModelStore(root / "store")
    plays = random_plays(N_USERS, N_TRACKS, 0.08, seed=11)
    counts = synthetic_counts(plays)
    train_and_publish(counts, store, PARAMS, holdout=0, show_progress=False)
    prefix = f"it-{uuid.uuid4().hex[:8]}-"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5, acks="all")
    shared = Shared()
    shared.expected = {}
    workers: list[WorkerProcess] = []

    def start(name: str = "w", **flags) -> WorkerProcess:
        worker = WorkerProcess(
            kafka_bootstrap,
            store.root,
            prefix,
            f"{prefix}app",
            root / name,
            session_timeout=6,
            min_listeners=5,
            **flags,
        )
        workers.append(worker)
        return worker

    yield {
        "store": store,
        "prefix": prefix,
        "producer": producer,
        "bootstrap": kafka_bootstrap,
        "start": start,
        "shared": shared,
        "plays": plays,
    }
    producer.close()
    for worker in workers:
        worker.stop()


def send_play(
    env, user: str, track: str, ms_played: int = 200_000, expected: bool = True, event_id: str | None = None
) -> None:
    key, value = encode_play(user, track, NOW_MS, ms_played, event_id)
    env["producer"].send(env["prefix"] + "plays", key=key, value=value)
    shared = env["shared"]
    shared.n_valid += 1
    if expected and ms_played >= 30_000:
        per_user = shared.expected.setdefault(user, {})
        per_user[track] = per_user.get(track, 0) + 1


def malformed(rng: random.Random, i: int) -> tuple[bytes, bytes]:
    good = msgpack.packb({"user": f"bad{i}", "track": "t1", "ts": NOW_MS, "ms_played": 40_000})
    kind = i % 5
    if kind == 0:
        return b"bad%d" % i, good[: rng.randint(1, len(good) - 1)]  # truncated
    if kind == 1:
        return b"bad%d" % i, msgpack.packb({"user": f"bad{i}", "track": 7, "ts": NOW_MS, "ms_played": 40_000})
    if kind == 2:
        return b"bad%d" % i, msgpack.packb(
            {"user": f"bad{i}", "track": "x" * (MAX_PAYLOAD_BYTES + 10), "ts": 1, "ms_played": 1}
        )
    if kind == 3:
        return b"bad%d" % i, msgpack.packb({"user": f"bad{i}", "track": "t1", "ts": NOW_MS, "ms_played": -5})
    return b"bad%d" % i, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))) + b"\xc1"


def test_counts_dead_letters_and_fold_in(env):
    shared = env["shared"]
    worker = shared.worker = env["start"]("a")
    worker.wait_ready()
    rng = random.Random(5)
    n_bad = 10_000
    for i in range(n_bad):
        if i % 2 == 0:  # valid events interleaved with the malformed ones
            user = f"u{rng.randrange(N_USERS)}" if i % 4 else f"s{rng.randrange(40)}"
            send_play(env, user, f"t{rng.randrange(N_TRACKS)}", ms_played=rng.choice([200_000, 31_000, 10_000]))
        key, value = malformed(rng, i)
        env["producer"].send(env["prefix"] + "plays", key=key, value=value)
    env["producer"].flush()
    shared.n_bad = n_bad
    wait_for(lambda: worker.metric("playrec_events_processed_total") >= shared.n_valid, 120, "all valid events")
    wait_for(lambda: worker.metric("playrec_dead_letters_total") >= n_bad, 60, "all dead letters")
    assert worker.metric("playrec_events_processed_total") == shared.n_valid
    assert worker.metric("playrec_dead_letters_total") == n_bad
    for user, counts in shared.expected.items():
        assert worker.get(f"/users/{user}/plays") == {"user": user, "plays": counts}
    # every malformed record is in the dead-letter topic, bytes intact, with a reason
    letters = read_topic(env["bootstrap"], env["prefix"] + "plays.dead-letter", n_bad, 30)
    assert len(letters) == n_bad
    assert {r.key for r in letters} == {b"bad%d" % i for i in range(n_bad)}  # one key per malformed record
    assert all(dict(r.headers).get("reason") for r in letters)
    # a user known only from the stream is served by fold-in, exactly as the half-step computes it
    user = next(u for u in shared.expected if u.startswith("s"))
    body = worker.get(f"/users/{user}/recommendations?k=5")
    assert body["source"] == "fold-in"
    live = LiveModel(env["store"].load(), use_index=False)
    vector = live.fold_in_users({user: shared.expected[user]})[user]
    want = live.recommend_vector(vector, 5, exclude=shared.expected[user])
    assert [i["track"] for i in body["items"]] == [s.track for s in want]
    np.testing.assert_allclose([i["score"] for i in body["items"]], [s.score for s in want], rtol=1e-3, atol=1e-5)
    assert not set(shared.expected[user]) & {i["track"] for i in body["items"]}
    # a model user with new streams: fold-in from training + streamed counts
    model_user = next(u for u in shared.expected if u.startswith("u"))
    assert worker.get(f"/users/{model_user}/recommendations?k=3")["source"] == "fold-in"
    # a user never seen: popularity, marked as such
    assert worker.get("/users/nobody-at-all/recommendations?k=3")["source"] == "popularity"
    status, body = worker.request("/users/x/recommendations?k=0")
    assert status == 400 and "k must be" in body["error"]
    status, _ = worker.request("/tracks/no-such-track/similar")
    assert status == 404


def test_new_track_becomes_recommendable(env):
    worker = env["shared"].worker
    listeners = [f"u{i}" for i in range(5)]
    for user in listeners[:4]:
        send_play(env, user, "fresh-track")
    env["producer"].flush()
    wait_for(lambda: worker.metric("playrec_events_processed_total") >= env["shared"].n_valid, 60, "plays applied")
    status, _ = worker.request("/tracks/fresh-track/similar")
    assert status == 404  # four listeners: not yet
    send_play(env, listeners[4], "fresh-track")
    env["producer"].flush()
    wait_for(lambda: worker.request("/tracks/fresh-track/similar?k=3")[0] == 200, 60, "the new track's vector")
    assert worker.metric("playrec_new_tracks") == 1
    status, body = worker.request("/recommendations?k=5", "POST", b'{"tracks": ["fresh-track"]}')
    assert status == 200 and body["source"] == "fold-in" and "fresh-track" not in [i["track"] for i in body["items"]]


def test_model_hot_swap(env):
    worker, store = env["shared"].worker, env["store"]
    old = worker.get("/ready")["version"]
    plays = env["plays"]
    counts = synthetic_counts(plays)
    report = train_and_publish(
        counts, store, AlsParams(factors=8, iterations=5, seed=3), holdout=0, show_progress=False
    )
    assert report.version != old
    announce_model(env["bootstrap"], report.version, store.root, topic_prefix=env["prefix"])
    wait_for(lambda: worker.get("/ready")["version"] == report.version, 60, "the new model to go live")
    user = next(u for u in env["shared"].expected if u.startswith("s"))
    body = worker.get(f"/users/{user}/recommendations?k=3")
    assert body["version"] == report.version and body["source"] == "fold-in"
    # a folded-in track's vector belongs to the old model's basis: not served by the new one until its
    # owner re-solves it from its listeners' re-folded vectors (then it is back, version-tagged)
    wait_for(
        lambda: (
            worker.metric("playrec_track_fold_ins_total") >= 2  # solved once before the swap
            and worker.request("/tracks/fresh-track/similar?k=3")[0] == 200
        ),
        60,
        "fresh-track re-solved against the new model",
    )


def send_again(env, user: str, track: str, event_id: str) -> None:
    """A client re-sending a play it already sent (same event id): a new record, not a new play."""
    key, value = encode_play(user, track, NOW_MS, 200_000, event_id)
    env["producer"].send(env["prefix"] + "plays", key=key, value=value)


def test_a_play_sent_again_is_counted_once(env):
    shared = env["shared"]
    worker = shared.worker
    processed = worker.metric("playrec_events_processed_total")
    for i, track in enumerate(["t1", "t2", "t3"]):
        send_play(env, "resender", track, event_id=f"play-{i}")
    send_again(env, "resender", "t1", "play-0")
    send_again(env, "resender", "t2", "play-1")
    for _ in range(2):  # no event id: two plays
        send_play(env, "resender", "t4")
    env["producer"].flush()
    wait_for(lambda: worker.metric("playrec_duplicate_events_total") >= 2, 60, "the re-sent plays")
    wait_for(lambda: worker.metric("playrec_events_processed_total") >= processed + 5, 60, "the plays")
    assert worker.metric("playrec_duplicate_events_total") == 2
    assert worker.metric("playrec_events_processed_total") == processed + 5
    assert worker.get("/users/resender/plays")["plays"] == {"t1": 1, "t2": 1, "t3": 1, "t4": 2}


def test_restart_recovers_tables_exactly(env):
    shared = env["shared"]
    shared.worker.stop()
    worker = shared.worker = env["start"]("a2")
    worker.wait_ready()
    for user, counts in shared.expected.items():
        got = wait_for(lambda u=user: worker.get(f"/users/{u}/plays")["plays"] or None, 30, f"counts of {user}")
        assert got == counts, user
    # the event ids a user's row remembers survive the restart: a re-send is still recognised
    send_again(env, "resender", "t3", "play-2")
    env["producer"].flush()
    wait_for(lambda: worker.metric("playrec_duplicate_events_total") >= 1, 60, "the re-sent play")
    assert worker.get("/users/resender/plays")["plays"] == shared.expected["resender"]


def test_two_workers_split_partitions_and_take_over(env):
    shared = env["shared"]
    a = shared.worker
    b = env["start"]("b")
    b.wait_ready()

    def split():
        ra, rb = a.ready(), b.ready()  # None while rebalancing
        if not (ra and rb):
            return None
        pa, pb = ra["partitions"], rb["partitions"]
        return pa and pb and sorted(pa + pb) == list(range(8)) and (pa, pb)

    pa, pb = wait_for(split, 90, "both workers to own partitions")
    assert not set(pa) & set(pb)
    # any worker answers for any user (routed to the owner)
    for user, counts in list(shared.expected.items())[:40]:
        assert a.get(f"/users/{user}/plays")["plays"] == counts
        assert b.get(f"/users/{user}/plays")["plays"] == counts
    # a client cannot skip routing with the routing header: a non-owner refuses instead of answering empty
    owned_by_b = [
        u for u in shared.expected if b.request(f"/users/{u}/plays", headers={"X-Playrec-Routed": "1"})[0] == 200
    ]
    assert owned_by_b and len(owned_by_b) < len(shared.expected)
    for user in shared.expected:
        status, body = a.request(f"/users/{user}/plays", headers={"X-Playrec-Routed": "1"})
        if user in owned_by_b:
            assert status == 503 and "does not own" in body["error"], (user, status, body)
        else:
            assert (status, body["plays"]) == (200, shared.expected[user]), user
    b.kill()
    wait_for(lambda: (a.ready() or {}).get("partitions") == list(range(8)), 90, "worker a to take over")
    send_play(env, "after-takeover", "t1")
    env["producer"].flush()
    for user, counts in shared.expected.items():
        got = wait_for(lambda u=user: a.get(f"/users/{u}/plays")["plays"] or None, 60, f"counts of {user}")
        assert got == counts, user


def test_train_from_the_stream_snapshot(env, tmp_path, capsys):
    """`playrec train --from-kafka` trains on the workers' counts, users known only to the stream included."""
    from kafka import KafkaProducer as Producer

    from batch.user_state import changelog_topic
    from playrec.cli import main

    shared, app_id = env["shared"], env["prefix"] + "app"
    args = [
        "train",
        "--from-kafka",
        env["bootstrap"],
        "--app-id",
        app_id,
        "--out",
        str(tmp_path / "s"),
        "--holdout",
        "0",
        "--factors",
        "8",
        "--iterations",
        "3",
        "--no-progress",
        "--no-index",
    ]
    assert main(args) == 0
    model = ModelStore(tmp_path / "s").load()
    stream_users = {u for u in shared.expected if u.startswith("s")}
    assert stream_users <= set(model.user_ids.tolist())
    source = model.manifest["input"]
    assert source["source"] == "stream" and source["topic"] == changelog_topic(app_id)
    assert sum(source["offsets"].values()) > 0
    # a foreign record in the changelog is reported, never skipped silently
    producer = Producer(bootstrap_servers=env["bootstrap"])
    producer.send(changelog_topic(app_id), key=b"not-a-user-row", value=b"\x93\x01\x02\x03").get(30)
    producer.close()
    capsys.readouterr()
    assert main(args) == 2
    assert "not user-state rows" in capsys.readouterr().err
    assert main([*args, "--skip-bad-records"]) == 0
    assert ModelStore(tmp_path / "s").load().manifest["input"]["skipped_records"] == 1


def retrain_args(env, store_root, iterations: int, trees: int, tolerance: float) -> list[str]:
    """`playrec retrain --once` against this module's stream (its changelog holds one foreign record)."""
    return [
        "retrain",
        "--once",
        "--from-kafka",
        env["bootstrap"],
        "--app-id",
        env["prefix"] + "app",
        "--out",
        str(store_root),
        "--factors",
        "8",
        "--iterations",
        str(iterations),
        "--trees",
        str(trees),
        "--no-progress",
        "--skip-bad-records",
        "--tolerance",
        str(tolerance),
    ]


def test_retrain_cycle_gates_publishes_and_the_stream_reconciles(env, capsys):
    """`playrec retrain --once`: snapshot, gate, publish, announce; plays during the retrain show after the swap."""
    import threading

    from playrec.cli import main

    shared, store = env["shared"], env["store"]
    worker = shared.worker
    before = worker.get("/ready")["version"]
    args = retrain_args(env, store.root, iterations=4, trees=5, tolerance=0.99)
    args += ["--announce", "--topic-prefix", env["prefix"]]
    late_user = "arrived-during-retrain"
    done = threading.Event()
    results = []

    def cycle():
        results.append(main(args))
        done.set()

    thread = threading.Thread(target=cycle)
    thread.start()
    while not done.is_set():  # plays that arrive while the retrain runs
        send_play(env, late_user, "t3")
        env["producer"].flush()
        done.wait(0.2)
    thread.join()
    assert results == [0]
    out = capsys.readouterr().out
    assert "published" in out and "passes the gate" in out
    version = store.current_version()
    assert version != before
    files = store.read_manifest(version)["files"]
    assert {"report.json", "loss.png", "metrics.png"} <= set(files)
    wait_for(lambda: worker.get("/ready")["version"] == version, 60, "the retrained model to go live")
    expected = shared.expected[late_user]
    wait_for(lambda: worker.get(f"/users/{late_user}/plays")["plays"] == expected, 60, "the late plays")
    body = worker.get(f"/users/{late_user}/recommendations?k=3")
    assert body["version"] == version and body["source"] == "fold-in"
    # a candidate much worse than the live model is not published, and the command still exits 0
    bad = [*retrain_args(env, store.root, iterations=0, trees=1, tolerance=0.0), "--no-index"]  # untrained factors
    assert main(bad) == 0
    assert "kept the live model" in capsys.readouterr().out and store.current_version() == version


def test_retrain_killed_at_any_point_leaves_the_store_consistent(env, tmp_path):
    """kill -9 during snapshot, training or publish: the live model stays, the next run succeeds."""
    import shutil
    import signal
    import subprocess
    import sys

    store = ModelStore(tmp_path / "store")
    shutil.copytree(env["store"].root, store.root)
    live = store.current_version()
    cmd = [sys.executable, "-m", "playrec.cli", *retrain_args(env, store.root, iterations=30, trees=20, tolerance=0.99)]
    for delay in (0.8, 1.6, 2.4, 3.2, 4.0, 5.0):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        current = store.current_version()
        store.verify(current)  # whatever CURRENT names is complete and intact
        # the old model, or a new one published completely (a kill after the CURRENT swap is fine)
        assert current == live or (current > live and proc.returncode in (0, -signal.SIGKILL))
        live = current
    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    store.verify(store.current_version())


def test_rocksdb_store_keeps_state_across_a_restart(env, tmp_path):
    """With the RocksDB table store (the `rocksdb` extra), a restarted worker resumes from its local state."""
    import rocksdict  # noqa: F401  (installed with the test extras: a missing store fails, never skips)

    prefix = env["prefix"] + "rk-"
    data_dir = tmp_path / "rocks"

    def start():
        worker = WorkerProcess(
            env["bootstrap"],
            env["store"].root,
            prefix,
            prefix + "app",
            tmp_path,
            table_store="rocksdb://",
            data_dir=data_dir,
            session_timeout=6,
        )
        worker.wait_ready()
        return worker

    def play(user, track):
        key, value = encode_play(user, track, NOW_MS, 200_000)
        env["producer"].send(prefix + "plays", key=key, value=value)

    worker = start()
    for i in range(30):
        play(f"rk{i % 7}", f"t{i % 4}")
    env["producer"].flush()
    wait_for(lambda: worker.metric("playrec_events_processed_total") >= 30, 60, "30 plays")
    before = {f"rk{u}": worker.get(f"/users/rk{u}/plays")["plays"] for u in range(7)}
    worker.stop()
    assert any(data_dir.rglob("*")), "the RocksDB store wrote nothing to the data dir"
    worker = start()
    try:
        play("rk0", "t9")
        env["producer"].flush()
        before["rk0"]["t9"] = 1
        for user, counts in before.items():
            wait_for(lambda u=user, c=counts: worker.get(f"/users/{u}/plays")["plays"] == c, 30, f"counts of {user}")
    finally:
        worker.stop()


def test_http_api_fuzz_never_answers_5xx(env):
    """Property-based requests against every route: 4xx for bad input, never 5xx, never a traceback."""
    import urllib.parse

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    worker = env["shared"].worker
    worker.wait_ready()
    ids = st.text(min_size=1, max_size=80).filter(lambda t: t not in (".", ".."))
    ks = st.one_of(st.none(), st.integers(-5, 2000).map(str), st.text(max_size=12))
    bodies = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda t: json_bytes({"tracks": t}), st.lists(st.one_of(ids, st.integers()), max_size=20)),
        st.builds(
            lambda p: json_bytes({"plays": p}),
            st.dictionaries(ids, st.one_of(st.integers(-3, 10**12), st.floats(), st.text())),
        ),
    )

    def path(template: str, *parts: str, k: str | None = None) -> str:
        quoted = [urllib.parse.quote(p, safe="") for p in parts]
        query = "" if k is None else "?k=" + urllib.parse.quote(k, safe="")
        return template.format(*quoted) + query

    def check(status: int, body) -> None:
        assert 0 < status < 500, (status, body)
        assert "Traceback" not in str(body)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(user=ids, track=ids, k=ks, body=bodies)
    def run(user, track, k, body):
        check(*worker.request(path("/users/{}/recommendations", user, k=k)))
        check(*worker.request(path("/users/{}/plays", user)))
        check(*worker.request(path("/users/{}/recommendations/{}/explanation", user, track)))
        check(*worker.request(path("/tracks/{}/similar", track, k=k)))
        check(*worker.request(path("/recommendations", k=k), "POST", body))

    run()
    status, _ = worker.request("/recommendations", "POST", b"x" * (70 * 1024))
    assert status == 400


def json_bytes(value) -> bytes:
    import json

    return json.dumps(value).encode()
