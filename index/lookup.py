"""The forest's id -> row lookup: a sorted base plus a dict of the rows added since.

The base is the saved ``lookup_rows`` array (rows sorted by id) with a snapshot of their ids; it is
searched with ``searchsorted`` and never edited in place. ``add()`` records new ``id -> row`` pairs
in a small dict (the *delta*) and ``remove()`` only clears ``alive`` (and drops delta entries), so
both cost O(m) for m ids instead of re-sorting all n ids. A base entry counts only while its row is
alive and still holds that id (rows of removed items are reused by later inserts). When the delta
outgrows ``max(MERGE_MIN, n_base / MERGE_FRACTION)`` entries it is merged into the base in
O(n + d log n) (one ``searchsorted`` of the sorted delta and one ``np.insert``): amortised O(1) per
insert. See ``docs/FOREST.md``, "Insert and remove".
"""

from __future__ import annotations

from typing import Any

import numpy as np

MERGE_MIN = 4096  # the delta may always hold this many entries before a merge
MERGE_FRACTION = 8  # ... or 1/8 of the base, whichever is larger


class IdLookup:
    """Find the live rows of ids: ``base_rows (n_base,) int64`` sorted by id, their ``keys`` (read
    lazily from the forest's ``ids`` the first time they are needed) and ``delta`` (id -> row)."""

    def __init__(self, base_rows: np.ndarray, keys: np.ndarray | None = None) -> None:
        self.base_rows = base_rows
        self._keys = keys
        self.delta: dict[Any, int] = {}

    @classmethod
    def build(cls, ids: np.ndarray, alive: np.ndarray) -> IdLookup:
        """A lookup without delta over the alive rows of ``ids (n,)``: one O(n log n) sort."""
        rows = np.flatnonzero(alive)
        base = rows[np.argsort(ids[rows], kind="stable")].astype(np.int64)
        return cls(base, ids[base])

    def snapshot(self, ids: np.ndarray) -> np.ndarray:
        """The base's keys ``(n_base,)``, read from ``ids`` on first use. Must run before any row of
        the base is given a new id (the forest calls it before reusing rows)."""
        if self._keys is None:
            self._keys = ids[self.base_rows]
        return self._keys

    def find(self, query: np.ndarray, ids: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the live items with ids ``query (m,)`` (already of the forest's id kind):
        ``(rows (m,) int64, found (m,) bool)``, rows -1 where not found. O(m log n)."""
        rows = np.full(len(query), -1, dtype=np.int64)
        found = np.zeros(len(query), dtype=bool)
        keys = self.snapshot(ids)
        if len(keys) and len(query):
            q, fits = _as_key_dtype(query, keys.dtype)
            pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            cand = self.base_rows[pos]
            found = fits & (keys[pos] == q) & alive[cand] & (ids[cand] == query)
            rows[found] = cand[found]
        if self.delta:
            miss = np.flatnonzero(~found)
            if len(miss):
                got = np.fromiter((self.delta.get(v, -1) for v in query[miss].tolist()), np.int64, len(miss))
                hit = got >= 0
                rows[miss[hit]] = got[hit]
                found[miss[hit]] = True
        return rows, found

    def add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Record new live items ``ids (m,)`` at ``rows (m,)``."""
        self.delta.update(zip(ids.tolist(), rows.tolist()))

    def discard(self, ids: np.ndarray) -> None:
        """Forget delta entries of removed ``ids`` (base entries die with their row's ``alive``)."""
        for v in ids.tolist():
            self.delta.pop(v, None)

    def needs_merge(self) -> bool:
        """Whether the delta has outgrown its bound (see the module docstring)."""
        return len(self.delta) > max(MERGE_MIN, len(self.base_rows) // MERGE_FRACTION)

    def merge(self, ids: np.ndarray, alive: np.ndarray) -> np.ndarray:
        """Fold the delta into the base and drop dead entries; returns the new ``base_rows``
        (rows of all live items sorted by id: the ``lookup_rows`` that is saved). O(n + d log n)."""
        keys = self.snapshot(ids)
        valid = alive[self.base_rows] & (ids[self.base_rows] == keys)
        rows, keys = self.base_rows[valid], keys[valid]
        if self.delta:
            dk = np.asarray(list(self.delta.keys()))
            if dk.dtype.kind in "iu":
                dk = dk.astype(np.int64)
            dr = np.fromiter(self.delta.values(), np.int64, len(self.delta))
            order = np.argsort(dk, kind="stable")
            dk, dr = dk[order], dr[order]
            dtype = np.result_type(keys.dtype, dk.dtype)  # str ids: the wider of the two widths
            at = np.searchsorted(keys, dk)
            rows = np.insert(rows, at, dr)
            keys = np.insert(keys.astype(dtype, copy=False), at, dk.astype(dtype, copy=False))
        self.base_rows, self._keys, self.delta = rows, keys, {}
        return rows

    def renumber(self, new_of_old: np.ndarray) -> np.ndarray:
        """After a row compaction: map the (merged, all-live) base through ``new_of_old (n_old,)``."""
        if self.delta:
            raise RuntimeError("merge() the lookup before renumbering its rows")
        self.base_rows = new_of_old[self.base_rows]
        return self.base_rows

    @property
    def key_bytes(self) -> int:
        """Bytes of the key snapshot (the base rows are the forest's ``lookup_rows``; the delta dict's
        Python objects are not counted)."""
        return 0 if self._keys is None else int(self._keys.nbytes)


def _as_key_dtype(query: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``query`` cast to the keys' ``dtype`` and a mask of the ids that can match at all.

    ``searchsorted`` of wider strings than the keys would cast all n keys (O(n) per call); ids
    longer than the keys' width cannot be in the base, so they are masked and the rest narrowed."""
    if query.dtype == dtype or query.dtype.kind != "U" or dtype.kind != "U" or query.itemsize <= dtype.itemsize:
        return query, np.ones(len(query), dtype=bool)
    fits = np.char.str_len(query) <= dtype.itemsize // 4
    return np.where(fits, query, "").astype(dtype), fits
