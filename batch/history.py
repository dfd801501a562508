"""One history: the counts a model lineage holds that are not in the stream, and their merge with it.

The stream's `user-state` table holds every user's *cumulative* streamed counts, so a snapshot at
any watermark already contains everything streamed before it. What the stream does not hold is the
history loaded from a file (`playrec train --plays`). A model version therefore keeps its
**history** beside its training counts, aligned with its own user/item rows:

- file-trained model: history = its training counts (`manifest.history.arrays == "plays"`; no copy);
- stream-trained model (no live model before it): no history (`arrays is None`);
- retrained model: history inherited from the live model (`history_{indptr,indices,counts}.npy`),
  training counts = history + the stream's snapshot.

The workers serve `history + streamed` (`stream.live_model.LiveModel.full_counts`), and a retrain
trains on `history + snapshot`: the same sum, each play counted once however many cycles run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from batch.model_store import Model, ModelCorruptError
from batch.plays import PlayCounts, ReadSummary

HISTORY_ARRAYS = ("history_indptr", "history_indices", "history_counts")
PLAYS_ARRAYS = ("plays_indptr", "plays_indices", "plays_counts")
#: Lineage entries kept in a manifest (the oldest, the history's origin, is always kept).
MAX_LINEAGE = 100

CsrArrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def history_mode(manifest: dict[str, Any]) -> str | None:
    """Which arrays hold a version's history: "plays", "history" or None (none).

    Manifests written before one history have no `history` field: stream-trained ones had none,
    file-trained ones had their training counts."""
    history = manifest.get("history")
    if isinstance(history, dict):
        mode = history.get("arrays")
        if mode not in ("plays", "history", None):
            raise ModelCorruptError(f"manifest history.arrays is {mode!r}: expected 'plays', 'history' or null")
        return mode
    return None if (manifest.get("input") or {}).get("source") == "stream" else "plays"


def _load_csr(model: Model, names: tuple[str, ...]) -> CsrArrays | None:
    paths = [model.artifact(f"{name}.npy") for name in names]
    if not all(p.is_file() for p in paths):
        return None
    indptr, indices, counts = (np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
    if len(indptr) != len(model.user_ids) + 1:
        rows = len(model.user_ids) + 1
        raise ModelCorruptError(f"{model.path}: {names[0]}.npy has {len(indptr)} entries, not {rows}: republish it")
    return indptr, indices, counts


def history_arrays(model: Model) -> CsrArrays | None:
    """(indptr int64 (n_users+1,), indices int32 (nnz,), counts float32 (nnz,)) of the version's
    history in its own rows/columns, memory-mapped; None when it has none."""
    mode = history_mode(model.manifest)
    if mode is None:
        return None
    arrays = _load_csr(model, PLAYS_ARRAYS if mode == "plays" else HISTORY_ARRAYS)
    if arrays is None and mode == "history":
        missing = f"{HISTORY_ARRAYS[0]}.npy"
        raise ModelCorruptError(f"{model.path}: the manifest names history arrays but {missing} is missing")
    return arrays


def _matrix(arrays: CsrArrays | None, shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR (shape) from arrays in a prefix of its rows and columns (None: all zero)."""
    if arrays is None:
        return sp.csr_matrix(shape, dtype=np.float32)
    indptr, indices, counts = arrays
    full = np.empty(shape[0] + 1, dtype=np.int64)
    full[: len(indptr)] = indptr
    full[len(indptr) :] = indptr[-1]
    return sp.csr_matrix(
        (np.asarray(counts, dtype=np.float32), np.asarray(indices, dtype=np.int32), full), shape=shape, copy=False
    )


def training_matrix(model: Model, shape: tuple[int, int]) -> sp.csr_matrix | None:
    """The version's training counts padded to `shape` (its ids a prefix); None if the store lacks them."""
    arrays = _load_csr(model, PLAYS_ARRAYS)
    return None if arrays is None else _matrix(arrays, shape)


def union_ids(base: np.ndarray, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, where): `base` in order followed by the ids of `extra` it lacks; `where[j]` = position of
    extra[j] in ids. Vectorised (sort + binary search), no per-id Python work."""
    base = np.asarray(base).astype(str)
    extra = np.asarray(extra).astype(str)
    where = np.full(len(extra), -1, dtype=np.int64)
    if len(base) and len(extra):
        order = np.argsort(base, kind="stable")
        ranked = base[order]
        loc = np.minimum(np.searchsorted(ranked, extra), len(base) - 1)
        found = ranked[loc] == extra
        where[found] = order[loc[found]]
    new = where < 0
    where[new] = len(base) + np.arange(int(new.sum()))
    return np.concatenate([base, extra[new]]), where


@dataclass
class Merged:
    """A retrain's input: `counts` = history + snapshot; `history` (CSR aligned with `counts`) the part
    of it not in the stream; `base_shape` the live model's (users, items), a prefix of `counts`' ids."""

    counts: PlayCounts
    history: sp.csr_matrix | None
    base_shape: tuple[int, int]


def merge_history(live: Model | None, snapshot: PlayCounts) -> Merged:
    """history(live) + snapshot in one id space: the live model's users/items first, then new ones.

    Cost O(nnz) in vectorised scipy/numpy (one sorted CSR + CSR merge), memory ~ 2x the merged
    arrays; no Python work per pair or per id beyond numpy's string sort.
    """
    if live is None:
        return Merged(snapshot, None, (0, 0))
    users, urow = union_ids(live.user_ids, snapshot.user_ids)
    items, icol = union_ids(live.item_ids, snapshot.item_ids)
    shape = (len(users), len(items))
    arrays = history_arrays(live)
    history = _matrix(arrays, shape) if arrays is not None else None
    stream = snapshot.matrix.tocoo()
    streamed = sp.csr_matrix(
        (stream.data.astype(np.float32), (urow[stream.row], icol[stream.col])), shape=shape, dtype=np.float32
    )
    total = streamed if history is None else (history + streamed).tocsr()
    total.sum_duplicates()
    total.sort_indices()
    summary = ReadSummary()
    summary.rows = int(total.nnz)
    counts = PlayCounts(total.astype(np.float32), users, items, None, summary)
    return Merged(counts, history, (len(live.user_ids), len(live.item_ids)))


def lineage_fields(live: Model | None, history: sp.csr_matrix | None) -> dict[str, Any]:
    """Manifest fields of a model trained on history(live) + the stream: `history` and `lineage`.

    `lineage` lists every version the history passed through, oldest first, each with its input
    (file path + sha256, or the stream watermark): capped at MAX_LINEAGE entries, the first kept."""
    if live is None:
        return {"history": {"arrays": None}, "lineage": []}
    past = list(live.manifest.get("lineage") or [])
    past.append({"version": live.version, "input": _input_summary(live.manifest.get("input") or {})})
    if len(past) > MAX_LINEAGE:
        past = [past[0], *past[-(MAX_LINEAGE - 1) :]]
    previous = live.manifest.get("history")
    origin = previous.get("origin") if isinstance(previous, dict) else None
    if origin is None and history_mode(live.manifest) == "plays":
        origin = {"version": live.version, "input": _input_summary(live.manifest.get("input") or {})}
    body: dict[str, Any] = {"arrays": None if history is None else "history", "from_version": live.version}
    if history is not None:
        body.update(origin=origin, users=int(np.count_nonzero(np.diff(history.indptr))), plays=int(history.nnz))
    return {"history": body, "lineage": past}


def _input_summary(source: dict[str, Any]) -> dict[str, Any]:
    keep = ("source", "path", "sha256", "topic", "offsets", "plays")
    return {k: source[k] for k in keep if k in source}
