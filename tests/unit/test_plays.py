"""Reading play-count files and counting streams from raw events."""

from pathlib import Path

import numpy as np
import pytest

from batch.plays import PlaysFileError, counts_from_events, read_play_counts


def write(tmp_path: Path, text: str, name: str = "plays.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_lastfm_style_tsv_with_header(tmp_path):
    path = write(tmp_path, "userID\tartistID\tweight\n2\t51\t13883\n2\t52\t11690\n3\t51\t7\n")
    counts = read_play_counts(path)
    assert counts.user_ids.tolist() == ["2", "3"]
    assert counts.item_ids.tolist() == ["51", "52"]
    assert counts.matrix.dtype == np.float32
    assert counts.matrix.toarray().tolist() == [[13883, 11690], [7, 0]]
    assert counts.summary.header == "userID\tartistID\tweight"


def test_csv_without_header_and_ids_kept_verbatim(tmp_path):
    path = write(tmp_path, "u-1,t 1,2\nu-1,007,1\n", "plays.csv")
    counts = read_play_counts(path)
    assert counts.user_ids.tolist() == ["u-1"]
    assert counts.item_ids.tolist() == ["t 1", "007"]
    assert counts.summary.header is None


def test_duplicates_are_summed_and_reported(tmp_path):
    counts = read_play_counts(write(tmp_path, "a,x,2\na,x,3\nb,x,1\n"))
    assert counts.matrix.toarray().tolist() == [[5], [1]]
    assert counts.summary.duplicate_rows_summed == 1
    assert "duplicate" in counts.summary.describe()


def test_zero_plays_keep_ids_without_preference(tmp_path):
    counts = read_play_counts(write(tmp_path, "a,x,0\nb,y,4\n"))
    assert counts.user_ids.tolist() == ["a", "b"]
    assert counts.item_ids.tolist() == ["x", "y"]
    assert counts.nnz == 1
    assert counts.summary.zero_play_rows == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,x,1\nb,y\n", ":2: expected 3 columns"),
        ("a,x,1\nb,y,many\n", ":2: plays 'many' is not a number"),
        ("a,x,1\nb,y,-3\n", ":2: plays must be a finite number >= 0"),
        ("a,x,1\nb,y,nan\n", ":2: plays must be a finite number >= 0"),
        ("a,x,1\n,y,3\n", ":2: empty user or track id"),
        ("user,track,plays\n", "no play rows found"),
        ("", "no play rows found"),
        ("a x 1\n", ":1: cannot tell the delimiter"),
        ("a,b,c,d,e\n", ":1: expected 3 columns"),
        ("a,x,1,1000\nb,y,1,soon\n", ":2: timestamp 'soon' is not a number"),
    ],
)
def test_bad_input_names_the_line(tmp_path, text, message):
    with pytest.raises(PlaysFileError, match=message.replace("(", r"\(")):
        read_play_counts(write(tmp_path, text, "bad.csv"))


def test_missing_file(tmp_path):
    with pytest.raises(PlaysFileError, match="no such file"):
        read_play_counts(tmp_path / "nope.tsv")


def test_timestamps_keep_the_latest_and_binarize(tmp_path):
    path = write(tmp_path, "1\t10\t5\t100\n1\t10\t3\t300\n1\t11\t4\t200\n", "u.data")
    counts = read_play_counts(path, binarize=True)
    assert counts.summary.has_timestamps
    assert counts.matrix.toarray().tolist() == [[2, 1]]
    assert counts.last_played.toarray().tolist() == [[300, 200]]


def test_counts_from_events_applies_the_30_second_rule():
    events = [("u", "a", 30_000), ("u", "a", 29_999), ("u", "a", 200_000), ("u", "b", 1_000), ("v", "b", 45_000)]
    counts = counts_from_events(events)
    assert counts.user_ids.tolist() == ["u", "v"]
    assert counts.item_ids.tolist() == ["a", "b"]
    assert counts.matrix.toarray().tolist() == [[2, 0], [0, 1]]
