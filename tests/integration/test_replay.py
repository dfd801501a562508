"""`playrec replay` against the real broker: every event arrives, valid, in the promised order."""

import msgpack
import pytest
from kafka import KafkaConsumer

from playrec.cli import main
from stream.events import decode_play
from stream.replay import count_events, replay_events

pytestmark = pytest.mark.integration


def consume_all(bootstrap: str, topic: str, expected: int, deadline_s: float = 60.0) -> list:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=int(deadline_s * 1000)
    )
    records = []
    try:
        for record in consumer:
            records.append(record)
            if len(records) >= expected:
                break
    finally:
        consumer.close()
    return records


def test_counts_file_is_expanded_to_one_event_per_play(tmp_path, kafka_bootstrap, unique_topic):
    path = tmp_path / "counts.tsv"
    path.write_text("user\tartist\tweight\na\tx\t3\na\ty\t1\nb\tx\t2\nc\tz\t40\n")
    assert count_events(path, max_per_pair=5) == 3 + 1 + 2 + 5
    code = main(
        [
            "replay",
            str(path),
            "--rate",
            "0",
            "--bootstrap",
            kafka_bootstrap,
            "--topic",
            unique_topic,
            "--max-per-pair",
            "5",
            "--no-progress",
        ]
    )
    assert code == 0
    records = consume_all(kafka_bootstrap, unique_topic, 11)
    events = [decode_play(r.key, r.value)[0] for r in records]
    assert all(events)
    pairs = {}
    for e in events:
        pairs[(e.user, e.track)] = pairs.get((e.user, e.track), 0) + 1
    assert pairs == {("a", "x"): 3, ("a", "y"): 1, ("b", "x"): 2, ("c", "z"): 5}
    assert len({e.event_id for e in events}) == 11


def test_timestamped_file_replays_in_time_order(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t10\t5\t881250949\n2\t20\t3\t881250000\n1\t30\t4\t881251000\n")
    events = [decode_play(*kv, now_ms=2_000_000_000_000)[0] for kv in replay_events(path, now_ms=1_900_000_000_000)]
    assert [e.track for e in events] == ["20", "10", "30"]
    assert events[-1].ts == 1_900_000_000_000 and events[0].ts == 1_900_000_000_000 - 1_000_000
    assert all(e.ms_played >= 30_000 for e in events)
    assert msgpack.unpackb(replay_events(path).__next__()[1])["event_id"] == "u:2:0"
