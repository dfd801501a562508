"""Which plays of a batch a worker counts (stream.worker.fresh_plays): each record exactly once."""

from stream.worker import fresh_plays


def test_plays_above_the_applied_offset_are_counted_in_order() -> None:
    plays = [(10, "a", 1), (12, "b", 1), (15, "a", 1)]
    assert fresh_plays(plays, 9) == plays
    assert fresh_plays(plays, 12) == [(15, "a", 1)]
    assert fresh_plays(plays, 15) == []  # a re-delivered batch


def test_a_record_fetched_twice_in_one_batch_counts_once() -> None:
    plays = [(10, "a", 1), (11, "b", 1), (11, "b", 1), (12, "c", 1), (11, "b", 1)]
    assert fresh_plays(plays, 9) == [(10, "a", 1), (11, "b", 1), (12, "c", 1)]
    assert fresh_plays(plays, 10) == [(11, "b", 1), (12, "c", 1)]
