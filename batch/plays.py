"""Play counts: reading `user,track,plays[,timestamp]` files and turning raw play events into counts.

A `PlayCounts` holds the users x tracks matrix of stream counts (CSR, float32) and the id arrays whose
positions are its rows and columns. Ids are kept exactly as written in the input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

#: A play counts as a stream when at least this many milliseconds were played (DESIGN.md section 1).
MIN_MS_PLAYED = 30_000


class PlaysFileError(ValueError):
    """A play-counts file cannot be read; the message names the file and line."""


@dataclass
class ReadSummary:
    """What reading a play-counts file did, so that nothing is dropped silently."""

    lines: int = 0
    header: str | None = None
    blank_lines: int = 0
    rows: int = 0
    duplicate_rows_summed: int = 0
    zero_play_rows: int = 0
    has_timestamps: bool = False

    def describe(self) -> str:
        """One human-readable line."""
        parts = [f"{self.rows:,} rows"]
        if self.header is not None:
            parts.append(f"header {self.header!r} skipped")
        if self.duplicate_rows_summed:
            parts.append(f"{self.duplicate_rows_summed:,} duplicate (user, track) rows summed")
        if self.zero_play_rows:
            parts.append(f"{self.zero_play_rows:,} rows with 0 plays (ids kept, no preference)")
        if self.blank_lines:
            parts.append(f"{self.blank_lines:,} blank lines")
        return ", ".join(parts)


@dataclass
class PlayCounts:
    """Stream counts per (user, track).

    matrix: CSR (n_users, n_tracks) float32, entry = number of streams (> 0 stored only).
    user_ids / item_ids: unicode arrays, position = row / column of `matrix`.
    last_played: optional CSR aligned with `matrix` holding the latest timestamp (any unit) per entry,
    used for time-based evaluation splits.
    """

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    last_played: sp.csr_matrix | None = None
    summary: ReadSummary = field(default_factory=ReadSummary)

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz)

    @classmethod
    def from_file(cls, path: str | Path, binarize: bool = False) -> PlayCounts:
        """Read a `user, track, plays[, timestamp]` CSV/TSV file, exactly as `playrec train --plays`."""
        return read_play_counts(path, binarize=binarize)

    @classmethod
    def from_arrays(
        cls,
        users: Sequence[object] | np.ndarray,
        tracks: Sequence[object] | np.ndarray,
        plays: Sequence[float] | np.ndarray,
        timestamps: Sequence[float] | np.ndarray | None = None,
    ) -> PlayCounts:
        """Counts from parallel arrays, one entry per (user, track, plays[, timestamp]) row, as if they
        were the rows of a file: ids become strings in first-seen order, duplicate pairs are summed (the
        latest timestamp wins), rows with 0 plays keep their ids without a preference. Raises
        `PlaysFileError` for arrays of different lengths, no rows, or plays that are negative or not finite."""
        user_ids, rows = _intern(users)
        item_ids, cols = _intern(tracks)
        values = np.asarray(plays, dtype=np.float64).ravel()
        stamps = None if timestamps is None else np.asarray(timestamps, dtype=np.float64).ravel()
        lengths = {len(rows), len(cols), len(values)} | (set() if stamps is None else {len(stamps)})
        if len(lengths) != 1:
            raise PlaysFileError(f"users, tracks, plays (and timestamps) must have the same length, got {lengths}")
        if not len(values):
            raise PlaysFileError("no play rows given")
        if not np.all(np.isfinite(values)) or values.min() < 0:
            raise PlaysFileError("plays must be finite numbers >= 0")
        if stamps is not None and not np.all(np.isfinite(stamps)):
            raise PlaysFileError("timestamps must be finite numbers")
        summary = ReadSummary(rows=len(values), has_timestamps=stamps is not None)
        return assemble_counts(rows, cols, values, stamps, user_ids, item_ids, summary)


def _intern(ids: Sequence[object] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique ids as unicode in first-seen order, position of each entry among them)."""
    text = np.asarray([str(i) for i in ids], dtype=str) if not isinstance(ids, np.ndarray) else ids.astype(str)
    text = text.ravel()
    unique, first, inverse = np.unique(text, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique ids by first appearance
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return unique[order], rank[inverse.ravel()]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _detect_delimiter(line: str) -> str:
    if "\t" in line:
        return "\t"
    if "," in line:
        return ","
    if ";" in line:
        return ";"
    raise PlaysFileError("cannot tell the delimiter: expected tab-, comma- or semicolon-separated columns")


class PlayRow(NamedTuple):
    """One data line of a play-counts file; `ts` is None without a timestamp column."""

    lineno: int
    user: str
    track: str
    plays: float
    ts: float | None


def iter_play_rows(path: str | Path, summary: ReadSummary | None = None) -> Iterator[PlayRow]:
    """Validated rows of a CSV/TSV file of `user, track, plays[, timestamp]`.

    A header line is recognised when its plays column is not a number; blank lines are counted in
    `summary`. Raises `PlaysFileError` naming the line for anything else: wrong column count, empty
    ids, non-numeric, negative or non-finite plays, bad timestamps.
    """
    path = Path(path)
    if not path.is_file():
        raise PlaysFileError(f"{path}: no such file")
    summary = summary if summary is not None else ReadSummary()
    delimiter: str | None = None
    n_columns = 0
    with path.open("r", encoding="utf-8", newline="") as handle:
        for lineno, raw in enumerate(handle, 1):
            summary.lines = lineno
            line = raw.rstrip("\r\n")
            if not line.strip():
                summary.blank_lines += 1
                continue
            if delimiter is None:
                try:
                    delimiter = _detect_delimiter(line)
                except PlaysFileError as exc:
                    raise PlaysFileError(f"{path}:{lineno}: {exc}") from None
                n_columns = len(line.split(delimiter))
                if n_columns not in (3, 4):
                    raise PlaysFileError(
                        f"{path}:{lineno}: expected 3 columns (user, track, plays) or 4 (plus timestamp), "
                        f"found {n_columns}"
                    )
                summary.has_timestamps = n_columns == 4
                if not _is_number(line.split(delimiter)[2].strip()):
                    summary.header = line
                    log.info("%s:%d: treating %r as a header line", path, lineno, line)
                    continue
            fields = line.split(delimiter)
            if len(fields) != n_columns:
                raise PlaysFileError(
                    f"{path}:{lineno}: expected {n_columns} columns, found {len(fields)}: {line[:200]!r}"
                )
            user, track = fields[0].strip(), fields[1].strip()
            if not user or not track:
                raise PlaysFileError(f"{path}:{lineno}: empty user or track id: {line[:200]!r}")
            text = fields[2].strip()
            try:
                value = float(text)
            except ValueError:
                raise PlaysFileError(f"{path}:{lineno}: plays {text!r} is not a number") from None
            if not math.isfinite(value) or value < 0:
                raise PlaysFileError(f"{path}:{lineno}: plays must be a finite number >= 0, got {text!r}")
            stamp = None
            if n_columns == 4:
                ts_text = fields[3].strip()
                try:
                    stamp = float(ts_text)
                except ValueError:
                    raise PlaysFileError(f"{path}:{lineno}: timestamp {ts_text!r} is not a number") from None
                if not math.isfinite(stamp):
                    raise PlaysFileError(f"{path}:{lineno}: timestamp {ts_text!r} is not finite")
            yield PlayRow(lineno, user, track, value, stamp)


class CountsBuilder:
    """Collects (user, track, streams[, timestamp]) triplets with id interning, then builds `PlayCounts`."""

    def __init__(self) -> None:
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.values: list[float] = []
        self.stamps: list[float] = []

    def add(self, user: str, track: str, streams: float, ts: float | None = None) -> None:
        self.rows.append(self.user_index.setdefault(user, len(self.user_index)))
        self.cols.append(self.item_index.setdefault(track, len(self.item_index)))
        self.values.append(streams)
        if ts is not None:
            self.stamps.append(ts)

    def add_user(self, user: str) -> None:
        """A user with no streams (kept in the ids)."""
        self.user_index.setdefault(user, len(self.user_index))

    def build(self, summary: ReadSummary | None = None) -> PlayCounts:
        summary = summary if summary is not None else ReadSummary()
        summary.rows = len(self.rows)
        return assemble_counts(
            np.asarray(self.rows, dtype=np.int64),
            np.asarray(self.cols, dtype=np.int64),
            np.asarray(self.values, dtype=np.float64),
            np.asarray(self.stamps, dtype=np.float64) if self.stamps else None,
            np.array(list(self.user_index), dtype=str),
            np.array(list(self.item_index), dtype=str),
            summary,
        )


def read_play_counts(path: str | Path, binarize: bool = False) -> PlayCounts:
    """Read a CSV/TSV file of `user, track, plays[, timestamp]` rows into `PlayCounts`.

    Rows are validated by `iter_play_rows`. Duplicate (user, track) rows are summed (timestamps: the
    latest wins). Rows with 0 plays keep their user and track ids but add no preference. With
    `binarize`, every row counts as one stream (e.g. MovieLens ratings as plays). Raises
    `PlaysFileError` naming the line for bad input, or for a file without any play row.
    """
    summary = ReadSummary()
    builder = CountsBuilder()
    for row in iter_play_rows(path, summary):
        builder.add(row.user, row.track, 1.0 if binarize else row.plays, row.ts)
    if not builder.rows:
        raise PlaysFileError(f"{path}: no play rows found (file is empty or holds only a header)")
    return builder.build(summary)


def assemble_counts(
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    stamps: np.ndarray | None,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    summary: ReadSummary,
) -> PlayCounts:
    """Build `PlayCounts` from COO triplets: duplicate (row, col) pairs are summed, zeros dropped."""
    shape = (len(user_ids), len(item_ids))
    order = np.lexsort((cols, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    summary.duplicate_rows_summed = int(len(rows) - first.sum())
    starts = np.flatnonzero(first)
    summed = np.add.reduceat(values, starts)
    urows, ucols = rows[starts], cols[starts]
    keep = summed > 0
    summary.zero_play_rows = int((~keep).sum())
    matrix = sp.csr_matrix((summed[keep].astype(np.float32), (urows[keep], ucols[keep])), shape=shape, dtype=np.float32)
    last = None
    if stamps is not None:
        latest = np.maximum.reduceat(stamps[order], starts)
        last = sp.csr_matrix((latest[keep], (urows[keep], ucols[keep])), shape=shape, dtype=np.float64)
    matrix.sort_indices()
    return PlayCounts(matrix=matrix, user_ids=user_ids, item_ids=item_ids, last_played=last, summary=summary)


def counts_from_events(events: Iterable[tuple[str, str, int]], min_ms_played: int = MIN_MS_PLAYED) -> PlayCounts:
    """Count streams from raw `(user, track, ms_played)` events.

    An event is a stream when `ms_played >= min_ms_played` (DESIGN.md: 30 s by default). Users and
    tracks seen only in shorter plays keep their ids with no preference.
    """
    builder = CountsBuilder()
    for user, track, ms_played in events:
        builder.add(user, track, 1.0 if ms_played >= min_ms_played else 0.0)
    return builder.build()
