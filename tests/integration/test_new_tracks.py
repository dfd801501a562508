"""A hit release through the real broker (issues #12 item 2 and #20): 100,000 listeners new to the
service (#12 asks for 100,000, #20 for 30,000) play `hit-single` first and then three known tracks. The
track is searchable within 10 s of its first five listeners having vectors, the worker stays up, its
track state stays bounded, and the published vector equals the exact item half-step over all 100,000
listeners' current vectors and counts. With two workers, the owner of the track's partition solves it and
both serve the vector it published."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import scipy.sparse as sp
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from batch.foldin import fold_in
from batch.user_state import changelog_topic, unpack_user
from stream.codec import unpack_message
from stream.events import encode_play
from stream.live_model import LiveModel
from stream.partitioning import KeyPartitioner
from stream.topics import LISTENERS_TABLE

from ..faults.harness import N_TRACKS, PARTITIONS, publish_model, unique_names
from ..faults.test_exactly_once import both_ready
from ..unit.synthetic import gram_from_scratch
from .workers import WorkerProcess, wait_for

pytestmark = pytest.mark.integration

HIT = "hit-single"
N_LISTENERS = 100_000


def read_all(bootstrap: str, topic: str) -> dict[bytes, bytes]:
    """The latest value of every key of `topic` (from the beginning to the end offsets)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        latest: dict[bytes, bytes] = {}
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    latest[record.key] = record.value
        return latest
    finally:
        consumer.close()


def expected_vector(bootstrap: str, app_id: str, live: LiveModel) -> tuple[np.ndarray, int]:
    """The item half-step over the hit's listeners as the changelog holds them, against X^T X of the model's
    user factors with each row replaced by the user's fold-in vector (one worker: its own X^T X)."""
    states = [(key.decode(), unpack_user(raw)) for key, raw in read_all(bootstrap, changelog_topic(app_id)).items()]
    gram = gram_from_scratch(live, states)
    vectors, counts = [], []
    for _, state in states:
        if state.vector is not None and state.version == live.version and state.counts.get(HIT):
            vectors.append(state.vector)
            counts.append(state.counts[HIT])
    n = len(counts)
    plays = sp.csr_matrix((np.asarray(counts, np.float32), np.arange(n), [0, n]), shape=(1, n))
    return fold_in(plays, np.asarray(vectors, np.float32), live.params, gram=gram)[0], n


def published_vector(bootstrap: str, prefix: str) -> dict | None:
    raw = read_all(bootstrap, prefix + "track-vectors").get(HIT.encode())
    return None if raw is None else unpack_message(raw)


def test_a_hit_whose_listeners_play_it_first_learns_from_all_of_them(kafka_bootstrap, tmp_path):
    store = publish_model(tmp_path)
    live = LiveModel(store.load())
    prefix, app_id = unique_names()
    worker = WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / "w", table_store=None)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    rng = random.Random(3)
    now = int(time.time() * 1000)

    def listen(users: range) -> None:
        for i in users:
            user = f"fan{i}"
            for track in [HIT, *(f"t{rng.randrange(N_TRACKS)}" for _ in range(3))]:  # the hit first
                key, value = encode_play(user, track, now, 200_000)
                producer.send(prefix + "plays", key=key, value=value)
        producer.flush()

    try:
        worker.wait_ready(120)
        listen(range(5))
        first_five = time.monotonic()
        wait_for(lambda: worker.request(f"/tracks/{HIT}/similar?k=3")[0] == 200, 10, "the hit to be searchable")
        searchable_s = time.monotonic() - first_five
        listen(range(5, N_LISTENERS))

        def caught_up():
            published = published_vector(kafka_bootstrap, prefix)
            if published is None or published["listeners"] < N_LISTENERS:
                return None
            want, n = expected_vector(kafka_bootstrap, app_id, live)
            got = np.frombuffer(published["x"], "<f4")
            error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            return (n, error, published) if n == N_LISTENERS and error < 1e-3 else None

        n, error, published = wait_for(caught_up, 120, "the hit's vector over all its listeners", interval_s=1.0)
        assert published["version"] == live.version
        largest = max(map(len, read_all(kafka_bootstrap, changelog_topic(app_id, LISTENERS_TABLE)).values()))
        assert largest < 64 * 1024, largest
        assert worker.proc.poll() is None
        print(
            f"\nhit release: searchable {searchable_s:.1f} s after its first 5 listeners; {n} listeners, final "
            f"vector within {error:.1e} of the batch half-step; largest track-listeners row {largest} B"
        )
    finally:
        producer.close()
        worker.stop()


N_TWO_WORKER_LISTENERS = 400


def test_two_workers_serve_the_owners_vector_of_a_new_track(kafka_bootstrap, tmp_path):
    """#20 test 3: with two workers, only the owner of the hit's `track-plays` partition solves it; both
    serve the vector it published (tagged with the live model's version), so both give the same answers."""
    store = publish_model(tmp_path)
    live = LiveModel(store.load())
    prefix, app_id = unique_names()
    workers = [
        WorkerProcess(kafka_bootstrap, store.root, prefix, app_id, tmp_path / name, table_store=None)
        for name in ("a", "b")
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20)
    rng = random.Random(5)
    now = int(time.time() * 1000)
    try:
        wait_for(lambda: both_ready(*workers), 120, "two workers splitting the partitions")
        for i in range(N_TWO_WORKER_LISTENERS):
            for track in [HIT, *(f"t{rng.randrange(N_TRACKS)}" for _ in range(3))]:
                key, value = encode_play(f"duo{i}", track, now, 200_000)
                producer.send(prefix + "plays", key=key, value=value)
        producer.flush()

        def settled():
            published = published_vector(kafka_bootstrap, prefix)
            if published is None or published["listeners"] < N_TWO_WORKER_LISTENERS:
                return None
            answers = [w.request(f"/tracks/{HIT}/similar?k=10") for w in workers]
            if any(status != 200 for status, _ in answers) or answers[0][1] != answers[1][1]:
                return None
            return published, answers[0][1]

        published, similar = wait_for(settled, 120, "both workers serving the hit over all its listeners", 1.0)
        assert published["version"] == live.version
        assert similar["version"] == live.version and len(similar["items"]) == 10
        body = json.dumps({"plays": {HIT: 3}}).encode()
        anonymous = [w.request("/recommendations?k=10", "POST", body) for w in workers]
        assert anonymous[0] == anonymous[1] and anonymous[0][0] == 200, anonymous
        assert anonymous[0][1]["source"] == "fold-in"

        home = KeyPartitioner(PARTITIONS)(HIT.encode())
        owner = next(i for i, w in enumerate(workers) if home in w.ready()["partitions"])
        solves = [w.metric("playrec_track_fold_ins_total") for w in workers]
        assert solves[owner] >= 1 and solves[1 - owner] == 0, solves
        assert all(w.proc.poll() is None for w in workers)
    finally:
        producer.close()
        for w in workers:
            w.stop()
