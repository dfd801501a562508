"""The :class:`HyperplaneForest`: build, insert, remove, batched queries, save/load.

Data layout (all flat numpy arrays, saved as-is; see ``docs/FOREST.md``):

* items: ``vectors (n, dim) float32`` raw vectors, ``norms (n,)``, ``ids (n,)`` (unicode or
  int64), ``alive (n,) bool``; ``lookup_rows`` = rows of live items sorted by id (id -> row).
* internal nodes: ``normals (n_int, rdim) float32`` unit split normals, ``offsets (n_int,)``,
  ``children (n_int, 2) int32`` node codes (``>= 0`` internal node, ``< 0`` leaf ``-1 - code``);
  ``roots (n_trees,) int32`` codes.
* leaves: ``leaf_start (n_leaf,) int64``, ``leaf_count``, ``leaf_cap`` into the concatenated
  ``leaf_items (L,) int32``; ``leaf_parent`` (``2 * node + side``, or ``-1 - tree`` for a root);
  ``leaf_centroid (n_leaf, rdim) float32`` and ``leaf_radius (n_leaf,)`` in routing space (leaf scan).

In memory (not saved): every array may be a prefix view of a bigger owning buffer (geometric
capacity growth, so inserts are amortised O(1) per row); ``row_slot (n, n_trees)`` and
``slot_leaf (L,)`` map rows to their leaf slots and slots to leaves (removals in O(n_trees)); the id
lookup keeps recent inserts in a dict beside ``lookup_rows`` (``index/lookup.py``). Removed items
leave their leaves at once, their rows are reused, and :meth:`HyperplaneForest.compact` drops
leftover dead rows and retired slots. See ``docs/FOREST.md``, "Churn".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import refine as _refine
from . import search as _search
from .errors import (
    DimensionError,
    DuplicateIdError,
    ForestError,
    IdTypeError,
    NotBuiltError,
    UnknownIdError,
)
from .lookup import IdLookup
from .storage import ARRAY_NAMES, load_arrays, save_arrays
from .transforms import check_metric, items_to_routing, queries_to_routing, routing_dim
from .tree_build import Grown, grow, merge

log = logging.getLogger(__name__)

_GROUP_ELEMENTS = 1 << 21  # (tree, item) pairs grown together: bounds build memory
_STATS_ROWS = 1 << 16  # leaf slots per leaf-statistics chunk (the gathered rows stay cache-sized)
SEARCH_MODES = ("auto", "tree", "scan")
_SCAN_RATIO = 4  # auto: scan when there are at most 4 * search_k leaves (or <= 2 trees)
_SCAN_BLOCK = 4096  # queries per block in scan mode (each probed leaf is read once per block)
_TAU_ITEMS = 40  # tau comes from the first leaves holding ~40 k items of each query
_REFINE_PASSES = 12  # default Lloyd passes over the leaves of a one-tree forest (leaf scan)
_GROWTH = 1.25  # capacity growth of the arrays add() appends to: amortised O(1) per row, <= 25% spare
_MIN_CAPACITY = 64
_COMPACT_DEAD = 0.25  # compact() when dead rows exceed this fraction of the rows ...
_COMPACT_SLOTS = 0.5  # ... or unused (retired) leaf slots this fraction of leaf_items ...
_COMPACT_MIN = 1024  # ... and there are at least this many of them
_ROW_ARRAYS = ("vectors", "norms", "ids", "alive")  # one row per item


def _as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise DimensionError(f"{what} must have shape (n, {dim}); got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DimensionError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(arr)


def _as_ids(ids: Any, n: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise DimensionError(f"ids must be a 1-D array of length {n} (one per vector); got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr):
        return arr.astype(str) if n else np.zeros(0, dtype="<U1")
    raise IdTypeError(f"ids must be all str or all int; got dtype {arr.dtype}")


def _slot_tags(n_trees: int) -> np.ndarray:
    """Placeholder slots ``-2 - tree`` of a new item's ``row_slot`` entries, until it is placed."""
    return -2 - np.arange(n_trees, dtype=np.int64)


def _slot_dtype(n_slots: int) -> type:
    """``row_slot`` holds positions in ``leaf_items``: int32 while they fit, else int64."""
    return np.int32 if n_slots < np.iinfo(np.int32).max else np.int64


class HyperplaneForest:
    """Annoy-style forest of random-hyperplane trees over ``dim``-dimensional float32 vectors.

    ``metric``: ``"dot"`` (maximum inner product, scores ``x . y``), ``"cosine"`` (scores in
    ``[-1, 1]``, 0 for zero vectors) or ``"euclidean"`` (scores are plain distances, smaller is
    better, returned ascending). ``leaf_size``: maximum items per leaf. ``beam_factor``: frontier
    width per query, in units of the leaves needed to reach ``search_k``. ``seed`` makes builds and
    inserts deterministic.

    ``search_mode``: ``"tree"`` walks the trees with Annoy's margin priority (many trees, small
    leaves); ``"scan"`` ranks every leaf by its routing-space centroid and radius and re-ranks leaf
    by leaf with one GEMM per leaf for all queries of a block (few trees, e.g. ``n_trees=1,
    leaf_size=64``: the fastest shape measured, see ``docs/BENCHMARKS-forest.md``); ``"auto"``
    (default) scans when ``n_trees <= 2`` or there are at most ``4 * search_k`` leaves.

    ``refine``: Lloyd (k-means) passes over the leaf partition in routing space after the build
    (``index/refine.py``); one tree only. Default: 12 for ``n_trees=1`` (unless
    ``search_mode="tree"``), else 0. Refined leaves are much tighter (at 1M MIPS items recall 0.95
    at ``search_k`` ~800 instead of ~11,000) at the price of a slower build; inserts into a refined
    forest go to the leaf with the nearest centroid.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "dot",
        n_trees: int = 50,
        leaf_size: int = 64,
        seed: int = 0,
        *,
        beam_factor: float = 1.0,
        sample: int = 32,
        iters: int = 3,
        balance: float = 0.2,
        search_mode: str = "auto",
        refine: int | None = None,
    ) -> None:
        if int(dim) < 1:
            raise DimensionError(f"dim must be >= 1; got {dim}")
        if int(n_trees) < 1:
            raise ValueError(f"n_trees must be >= 1; got {n_trees}")
        if int(leaf_size) < 2:
            raise ValueError(f"leaf_size must be >= 2; got {leaf_size}")
        if not 0.0 <= balance < 0.5:
            raise ValueError(f"balance must be in [0, 0.5); got {balance}")
        if search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode must be one of {', '.join(SEARCH_MODES)}; got {search_mode!r}")
        self.dim = int(dim)
        self.metric = check_metric(metric)
        self.n_trees = int(n_trees)
        self.leaf_size = int(leaf_size)
        self.seed = int(seed)
        self.beam_factor = float(beam_factor)
        self.sample = max(int(sample), 2)
        self.iters = int(iters)
        self.balance = float(balance)
        self.search_mode = search_mode
        if refine is None:  # leaf-scan forests (one tree) get Lloyd-refined leaves by default
            refine = _REFINE_PASSES if self.n_trees == 1 and search_mode != "tree" else 0
        if int(refine) < 0:
            raise ValueError(f"refine must be >= 0; got {refine}")
        if int(refine) and self.n_trees != 1:
            raise ValueError(f"refine (Lloyd passes over the leaves) needs n_trees=1; got n_trees={n_trees}")
        self.refine = int(refine)
        #: ``search_k`` of queries that give none (``None``: the formula in :meth:`query_batch`); set by
        #: ``index.calibrate`` to the smallest value reaching a recall target on this forest's data.
        self.default_search_k: int | None = None
        self.ref_norm = 0.0
        self.n_adds = 0
        self._a: dict[str, np.ndarray] | None = None
        self._buf: dict[str, np.ndarray] = {}  # owning buffers (spare capacity) behind the arrays of _a
        self._lookup: IdLookup | None = None
        self._free: np.ndarray | None = None  # sorted dead rows in no leaf, reused by add(); None: derive
        self._n_live = 0
        self._dead_in_leaves = False  # files written before 2026-12: removed items may sit in leaves
        self._cache: dict[str, Any] = {}  # derived arrays (scan leaves, row scales); reset on add/remove
        self._mutable = True
        self.reallocations = 0  # buffer reallocations by add() (capacity growth; see _append)
        self.compactions = 0

    # ------------------------------------------------------------------ state helpers
    @property
    def built(self) -> bool:
        """Whether :meth:`build` (or :meth:`load`) has run."""
        return self._a is not None

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._a is None:
            raise NotBuiltError("the forest is empty: call build(vectors, ids) or HyperplaneForest.load() first")
        return self._a

    def _ensure_mutable(self) -> None:
        """Copy memory-mapped arrays (a loaded forest) and the caller's arrays (kept by build())
        into owned buffers before the first in-place change."""
        if not self._mutable:
            a = self._arrays()
            for name in ARRAY_NAMES:
                if name not in self._buf:
                    self._set(name, np.array(a[name]))
            self._mutable = True

    def _prepare_mutation(self) -> None:
        """Own every array (copy memory-mapped ones) and take removed items out of the leaves of a
        forest saved by older code (they were masked, not dropped), before the first change."""
        self._ensure_mutable()
        if self._dead_in_leaves:
            dead = np.flatnonzero(~self._arrays()["alive"])
            self._purge_rows(dead)
            self._dead_in_leaves = False
            log.info("took %d removed items out of the leaves of a forest saved by older code", len(dead))

    def _set(self, name: str, arr: np.ndarray) -> None:
        """Replace array ``name`` by ``arr`` (which becomes its buffer: no spare capacity)."""
        self._arrays()[name] = arr
        self._buf[name] = arr

    def _append(self, name: str, values: np.ndarray) -> None:
        """Append ``values`` along axis 0 to array ``name``: amortised O(len(values)).

        The array is a prefix view of an owning buffer; when the buffer is full it is reallocated
        with capacity ``max(needed, capacity * _GROWTH, _MIN_CAPACITY)`` (geometric growth, so n
        single-row appends cost O(log n) reallocations). String ids wider than the buffer's width
        reallocate it with the wider dtype."""
        a = self._arrays()
        cur = a[name]
        n, m = len(cur), len(values)
        dtype = np.result_type(cur.dtype, values.dtype) if cur.dtype.kind == "U" else cur.dtype
        buf = self._buf.get(name)
        if buf is None or n + m > len(buf) or buf.dtype != dtype:
            buf = self._reallocate(name, n + m, dtype)
        buf[n : n + m] = values
        a[name] = buf[: n + m]

    def _reallocate(self, name: str, need: int, dtype: np.dtype) -> np.ndarray:
        """A new owning buffer for array ``name`` with room for ``need`` rows, the old rows copied."""
        cur = self._arrays()[name]
        old = self._buf.get(name, cur)
        cap = len(old) if len(old) >= need else max(need, int(len(old) * _GROWTH), _MIN_CAPACITY)
        buf = np.empty((cap, *cur.shape[1:]), dtype=dtype)
        buf[: len(cur)] = cur
        self._buf[name] = buf
        self.reallocations += 1
        log.debug("grew forest array %s: %d -> %d rows (%d used)", name, len(old), cap, len(cur))
        return buf

    def _capacity(self, name: str) -> int:
        """Rows that array ``name`` can hold before its next reallocation."""
        a = self._arrays()
        return len(self._buf.get(name, a[name]))

    @property
    def id_kind(self) -> str:
        """``"str"`` or ``"int"``."""
        return "str" if self._arrays()["ids"].dtype.kind == "U" else "int"

    def __len__(self) -> int:
        """Number of live (not removed) items."""
        return 0 if self._a is None else self._n_live

    def __contains__(self, item_id: object) -> bool:
        if self._a is None:
            return False
        _rows, found = self._rows_of(np.asarray([item_id]))
        return bool(found[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the forest's arrays: vectors, spare capacity and derived indexes (slot maps,
        the id lookup's key snapshot) included; the id lookup's small dict of recent inserts is not."""
        if self._a is None:
            return 0
        held = sum(self._buf.get(k, v).nbytes for k, v in self._a.items())
        return int(held + (self._lookup.key_bytes if self._lookup is not None else 0))

    def stats(self) -> dict[str, Any]:
        """Sizes and shape figures of the forest (for logs and benchmarks).

        ``rows``: item rows including ``dead_rows`` (removed, reusable by :meth:`add`);
        ``row_capacity``: rows the buffers hold before the next reallocation; ``leaf_slots``: length
        of ``leaf_items``, of which ``unused_slots`` belong to retired leaves."""
        a = self._arrays()
        counts = a["leaf_count"][a["leaf_cap"] > 0]
        return {
            "items": len(self),
            "rows": len(a["vectors"]),
            "dead_rows": len(a["vectors"]) - len(self),
            "row_capacity": self._capacity("vectors"),
            "trees": self.n_trees,
            "internal_nodes": len(a["offsets"]),
            "leaves": len(counts),
            "leaf_slots": len(a["leaf_items"]),
            "unused_slots": self._unused_slots(),
            "mean_leaf": float(counts.mean()) if len(counts) else 0.0,
            "max_leaf": int(counts.max()) if len(counts) else 0,
            "bytes": self.nbytes,
            "index_bytes": self.nbytes - int(self._buf.get("vectors", a["vectors"]).nbytes),
            "reallocations": self.reallocations,
            "compactions": self.compactions,
        }

    # ------------------------------------------------------------------ ids
    def _reset_lookup(self) -> None:
        """Build the id lookup from scratch (O(n log n); build only: later changes are incremental)."""
        a = self._arrays()
        self._lookup = IdLookup.build(a["ids"], a["alive"])
        self._set("lookup_rows", self._lookup.base_rows)
        self._cache = {}

    def _merge_lookup(self) -> None:
        """Fold the lookup's recent inserts into the sorted ``lookup_rows`` (what is saved)."""
        a = self._arrays()
        if self._lookup is not None and (self._lookup.delta or len(self._lookup.base_rows) != self._n_live):
            self._set("lookup_rows", self._lookup.merge(a["ids"], a["alive"]))

    def _coerce_ids(self, ids: np.ndarray) -> np.ndarray | None:
        """Cast ``ids`` to the forest's id dtype, or ``None`` if none can match."""
        if len(ids) == 0:
            return None
        kind = self.id_kind
        if kind == "int" and ids.dtype.kind in "iu":
            return ids.astype(np.int64)
        if kind == "str" and ids.dtype.kind == "U":
            return ids
        if kind == "str" and ids.dtype.kind == "O" and all(isinstance(v, str) for v in ids):
            return ids.astype(str)
        return None

    def _rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of live items with these ids ``(rows, found)``; rows are -1 where not found."""
        a = self._arrays()
        q = self._coerce_ids(ids)
        if q is None or self._lookup is None:
            return np.full(len(ids), -1, dtype=np.int64), np.zeros(len(ids), dtype=bool)
        return self._lookup.find(q, a["ids"], a["alive"])

    # ------------------------------------------------------------------ build
    def build(self, vectors: np.ndarray, ids: Sequence[Any] | np.ndarray) -> HyperplaneForest:
        """Build ``n_trees`` trees over ``vectors (n, dim)`` with unique ``ids (n,)``; returns self."""
        t0 = time.perf_counter()
        x = _as_matrix(vectors, self.dim, "vectors")
        id_arr = _as_ids(ids, len(x))
        # the caller's arrays are kept as they are (no copy) until the first add/remove, which
        # copies them: the forest writes into its row arrays (rows of removed items are reused)
        shared = {
            name
            for name, mine, given in (("vectors", x, vectors), ("ids", id_arr, ids))
            if isinstance(given, np.ndarray) and np.may_share_memory(mine, given)
        }
        srt = np.sort(id_arr)
        if len(srt) > 1 and (srt[1:] == srt[:-1]).any():
            raise DuplicateIdError("ids passed to build() must be unique")
        n = len(x)
        norms = np.linalg.norm(x, axis=1).astype(np.float32)
        self.ref_norm = float(norms.max()) if n else 0.0
        self.n_adds = 0
        rdim = routing_dim(self.metric, self.dim)
        a: dict[str, np.ndarray] = {
            "vectors": x,
            "norms": norms,
            "ids": id_arr,
            "alive": np.ones(n, dtype=bool),
            "lookup_rows": np.zeros(0, np.int64),
            "normals": np.zeros((0, rdim), np.float32),
            "offsets": np.zeros(0, np.float32),
            "children": np.zeros((0, 2), np.int32),
            "roots": np.zeros(self.n_trees, np.int32),
            "leaf_start": np.zeros(0, np.int64),
            "leaf_count": np.zeros(0, np.int32),
            "leaf_cap": np.zeros(0, np.int32),
            "leaf_parent": np.zeros(0, np.int64),
            "leaf_items": np.zeros(0, np.int32),
            "leaf_centroid": np.zeros((0, rdim), np.float32),
            "leaf_radius": np.zeros(0, np.float32),
        }
        self._a = a
        self._buf = {k: v for k, v in a.items() if k not in shared}
        self._mutable = not shared
        self._n_live = n
        self._free = np.zeros(0, np.int64)
        self._dead_in_leaves = False
        self._reset_lookup()
        z = items_to_routing(x, self.metric, self.ref_norm)
        rng = np.random.default_rng(self.seed)
        group = max(1, _GROUP_ELEMENTS // max(n, 1))
        parts = []
        for t0_tree in range(0, self.n_trees, group):
            trees = np.arange(t0_tree, min(t0_tree + group, self.n_trees))
            items = np.tile(np.arange(n, dtype=np.int32), len(trees))
            g = grow(
                items,
                np.arange(len(trees)) * n,
                np.full(len(trees), n),
                z,
                self.leaf_size,
                rng,
                sample=self.sample,
                iters=self.iters,
                balance=self.balance,
            )
            parts.append(g)
        # one graft for all groups: grafting per group re-copied every accumulated array each time
        g = merge(parts)
        big = None
        if self.refine and n:
            g, big = self._refine_leaves(g, z)
        self._graft(g, np.arange(n, dtype=np.int64), -1 - np.arange(self.n_trees, dtype=np.int64), tight=True, z=z)
        if big is not None and len(big[0]):
            self._split_leaves(*big, z, rng)
        log.info(
            "built %d trees over %d items (%s) in %.2fs: %s",
            self.n_trees,
            n,
            self.metric,
            time.perf_counter() - t0,
            self.stats(),
        )
        return self

    def _refine_leaves(self, g: Grown, z: np.ndarray) -> tuple[Grown, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Lloyd passes over the leaf partition of a one-tree ``g`` (see ``index/refine.py``).

        Returns ``g`` with the refined leaf contents (same nodes) and the leaves that grew beyond
        ``leaf_size`` as ``(leaf, rows, counts)``: they are left empty in ``g`` and split after the
        graft by :meth:`_split_leaves`."""
        n_leaf = len(g.leaf_count)
        cnt = g.leaf_count.astype(np.int64)
        labels = np.empty(len(g.items), dtype=np.int64)
        labels[g.items[_search.ragged_ranges(g.leaf_start, cnt)]] = np.repeat(np.arange(n_leaf), cnt)
        labels = _refine.lloyd(z, labels, n_leaf, self.refine)
        counts = np.bincount(labels, minlength=n_leaf).astype(np.int64)
        order = np.argsort(labels, kind="stable").astype(np.int32)
        over = counts > self.leaf_size
        keep = np.repeat(~over, counts)
        kc = np.where(over, 0, counts)
        g = Grown(
            normals=g.normals,
            offsets=g.offsets,
            children=g.children,
            leaf_start=np.cumsum(kc) - kc,
            leaf_count=kc.astype(np.int32),
            leaf_parent=g.leaf_parent,
            roots=g.roots,
            items=order[keep],
        )
        return g, (np.flatnonzero(over), order[~keep], counts[over])

    def _split_leaves(self, leaves: np.ndarray, rows: np.ndarray, counts: np.ndarray, z: np.ndarray, rng) -> None:
        """Split leaves whose refined contents (``rows``, ``counts`` per leaf, consecutive) exceed
        ``leaf_size``: 2-means subtrees like the build's, grafted in place of the (empty) leaves."""
        starts = np.cumsum(counts) - counts
        self._regrow(leaves, rows, starts, counts, z, rng, np.arange(len(z), dtype=np.int64), tight=True, z_graft=z)

    def _regrow(
        self,
        leaves: np.ndarray,
        rows: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        z: np.ndarray,
        rng: np.random.Generator,
        local_to_row: np.ndarray,
        *,
        tight: bool,
        z_graft: np.ndarray | None = None,
        old_pos: np.ndarray | None = None,
    ) -> None:
        """Grow 2-means subtrees (like the build's) over the runs ``rows[starts[i]:][:counts[i]]`` of ``z``
        and graft them in place of ``leaves``, which are emptied. ``old_pos``: see :meth:`_graft`."""
        a = self._arrays()
        g = grow(
            rows, starts, counts, z, self.leaf_size, rng, sample=self.sample, iters=self.iters, balance=self.balance
        )
        refs = a["leaf_parent"][leaves].copy()
        a["leaf_count"][leaves] = 0
        a["leaf_cap"][leaves] = 0
        self._graft(g, local_to_row, refs, tight=tight, z=z_graft, old_pos=old_pos)

    def _graft(
        self,
        g: Grown,
        local_to_row: np.ndarray,
        seg_refs: np.ndarray,
        *,
        tight: bool,
        z: np.ndarray | None = None,
        old_pos: np.ndarray | None = None,
    ) -> None:
        """Append grown nodes; segment ``j``'s root replaces the node referenced by ``seg_refs[j]``.

        ``g.items`` index ``local_to_row``; ``old_pos`` (same indexing): the leaf slot each item had
        before (or its placeholder, see :meth:`add`), so that the slot maps follow the move."""
        a = self._arrays()
        n_int0, n_leaf0, l0 = len(a["offsets"]), len(a["leaf_count"]), len(a["leaf_items"])

        def remap(codes: np.ndarray) -> np.ndarray:
            codes = codes.astype(np.int64)
            return np.where(codes >= 0, codes + n_int0, codes - n_leaf0).astype(np.int32)

        self._append("normals", g.normals)
        self._append("offsets", g.offsets)
        self._append("children", remap(g.children))
        parent = np.where(g.leaf_parent >= 0, g.leaf_parent + 2 * n_int0, seg_refs[np.maximum(-1 - g.leaf_parent, 0)])
        self._append("leaf_parent", parent)
        self._append("leaf_count", g.leaf_count)
        items = local_to_row[g.items].astype(np.int32)
        if tight:
            start = g.leaf_start + l0
            cap = g.leaf_count.copy()
            new_items = items
            placed, placed_pos = g.items, l0 + np.arange(len(g.items), dtype=np.int64)
        else:
            cap = np.full(len(g.leaf_count), self.leaf_size, dtype=np.int32)
            start = l0 + np.arange(len(cap), dtype=np.int64) * self.leaf_size
            new_items = np.full(len(cap) * self.leaf_size, -1, dtype=np.int32)
            c = g.leaf_count.astype(np.int64)
            within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            src, dst = np.repeat(g.leaf_start, c) + within, np.repeat(start - l0, c) + within
            new_items[dst] = items[src]
            placed, placed_pos = g.items[src], l0 + dst
        self._append("leaf_start", start)
        self._append("leaf_cap", cap)
        self._append("leaf_items", new_items)
        if "slot_leaf" in a:
            sl = np.full(len(new_items), -1, dtype=np.int32)
            sl[_search.ragged_ranges(start - l0, cap)] = np.repeat(np.arange(n_leaf0, n_leaf0 + len(cap)), cap)
            self._append("slot_leaf", sl)
        if "row_slot" in a:
            if old_pos is None:
                raise RuntimeError("_graft: the slot maps need the items' previous slots (old_pos)")
            self._move_slots(local_to_row[placed], old_pos[placed], placed_pos)
        roots = remap(g.roots)
        inner = seg_refs >= 0
        a["children"][seg_refs[inner] // 2, seg_refs[inner] % 2] = roots[inner]
        a["roots"][-1 - seg_refs[~inner]] = roots[~inner]
        n_new = len(g.leaf_count)
        self._append("leaf_centroid", np.zeros((n_new, a["leaf_centroid"].shape[1]), np.float32))
        self._append("leaf_radius", np.zeros(n_new, np.float32))
        self._update_leaf_stats(np.arange(n_leaf0, n_leaf0 + n_new), z)

    def _update_leaf_stats(self, leaves: np.ndarray, z_all: np.ndarray | None = None) -> None:
        """Recompute routing-space centroid and radius of ``leaves`` (used by the leaf scan).

        ``z_all``: routing vectors of all rows when already at hand (build), else derived from
        ``vectors``."""
        a = self._arrays()
        leaves = np.asarray(leaves, dtype=np.int64)
        cnt_all = a["leaf_count"][leaves].astype(np.int64)
        i = 0
        while i < len(leaves):  # chunks of about _STATS_ROWS slots
            cum = np.cumsum(cnt_all[i:])
            j = i + max(1, int(np.searchsorted(cum, _STATS_ROWS, side="right")))
            lv, c = leaves[i:j], cnt_all[i:j]
            within = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            rows = a["leaf_items"][np.repeat(a["leaf_start"][lv], c) + within]
            if z_all is not None:
                z = np.take(z_all, rows, axis=0)
            else:
                z = items_to_routing(a["vectors"][rows], self.metric, self.ref_norm)
            cent, rad = _search.leaf_stats(z, c)
            a["leaf_centroid"][lv] = cent
            a["leaf_radius"][lv] = rad
            i = j

    # ------------------------------------------------------------------ insert / remove
    def _descend(self, z: np.ndarray) -> np.ndarray:
        """Leaf ids ``(m, n_trees)`` that routing vectors ``z (m, rdim)`` fall into."""
        a = self._arrays()
        codes = np.broadcast_to(a["roots"], (len(z), self.n_trees)).copy()
        while True:
            inner = codes >= 0
            if not inner.any():
                return -1 - codes
            r, t = np.nonzero(inner)
            c = codes[r, t]
            m = np.einsum("ij,ij->i", a["normals"][c], z[r]) - a["offsets"][c]
            codes[r, t] = a["children"][c, (m > 0).astype(np.int64)]

    def _nearest_leaf(self, z: np.ndarray) -> np.ndarray:
        """Leaf ``(m, 1)`` with the nearest routing-space centroid among non-empty leaves."""
        a = self._arrays()
        live = np.flatnonzero((a["leaf_count"] > 0) & (a["leaf_cap"] > 0))
        if not len(live):
            return self._descend(z)
        cent = np.ascontiguousarray(a["leaf_centroid"][live])
        csq = np.einsum("ij,ij->i", cent, cent)
        out = np.empty(len(z), dtype=np.int64)
        step = max(1, (1 << 22) // len(live))
        for c0 in range(0, len(z), step):
            s = z[c0 : c0 + step] @ cent.T
            s *= 2.0
            s -= csq
            out[c0 : c0 + step] = live[np.argmax(s, axis=1)]
        return out[:, None]

    def add(self, vectors: np.ndarray, ids: Sequence[Any] | np.ndarray) -> None:
        """Insert ``vectors (m, dim)`` with new unique ``ids (m,)`` into every tree, without rebuild.

        Rows of removed items are reused first (lowest first); the rest are appended to the row
        arrays, which grow geometrically (amortised O(m), see ``docs/FOREST.md``). Each item descends
        every tree to a leaf (a refined forest: the leaf with the nearest routing-space centroid); a
        leaf with spare capacity takes it in place, a full one is moved to the end of ``leaf_items``
        with room for ``leaf_size`` items, and a leaf that would exceed ``leaf_size`` is split
        (2-means hyperplanes, like the build). Cost: O(m * n_trees * depth) plus the touched leaves
        (a refined forest: one ``(m, n_leaf)`` centroid product instead of the descent).
        """
        t0 = time.perf_counter()
        a = self._arrays()
        x = _as_matrix(vectors, self.dim, "vectors")
        id_arr = _as_ids(ids, len(x))
        if not len(x):
            return
        if (a["ids"].dtype.kind == "U") != (id_arr.dtype.kind == "U"):
            raise IdTypeError(f"this forest has {self.id_kind} ids; got ids of dtype {id_arr.dtype}")
        uniq = np.unique(id_arr)
        if len(uniq) != len(id_arr):
            raise DuplicateIdError("ids passed to add() must be unique")
        _, found = self._rows_of(id_arr)
        if found.any():
            raise DuplicateIdError(
                f"{int(found.sum())} ids are already in the forest, e.g. "
                f"{id_arr[found][:3].tolist()}; remove() them first to replace"
            )
        self._prepare_mutation()
        a = self._arrays()
        norms = np.linalg.norm(x, axis=1).astype(np.float32)
        over = int((norms > self.ref_norm).sum()) if self.metric == "dot" else 0
        if over:
            log.warning(
                "%d added vectors have norm above the build's reference norm %.4g (max %.4g); "
                "they are routed by direction only; rebuild to restore full MIPS routing",
                over,
                self.ref_norm,
                float(norms.max()),
            )
        rows = self._place_rows(x, norms, id_arr)
        z = items_to_routing(x, self.metric, self.ref_norm)
        # (m * n_trees,), row-major: item then tree; refined leaves no longer follow the tree's
        # hyperplanes, so items go to the nearest leaf centroid (the rule the refinement used)
        leaf = (self._nearest_leaf(z) if self.refine else self._descend(z)).ravel()
        new_rows = np.repeat(rows, self.n_trees)
        tag = np.tile(_slot_tags(self.n_trees), len(rows))  # placeholder slot of (item, tree)
        order = np.argsort(leaf, kind="stable")
        leaf, new_rows, tag = leaf[order], new_rows[order], tag[order]
        touched, first, n_new = np.unique(leaf, return_index=True, return_counts=True)
        count = a["leaf_count"][touched].astype(np.int64)
        fits = count + n_new <= a["leaf_cap"][touched]
        # 1) in place
        if fits.any():
            el = np.repeat(fits, n_new)
            rank = np.arange(len(leaf)) - np.repeat(first, n_new)
            dest = a["leaf_start"][leaf[el]] + a["leaf_count"][leaf[el]] + rank[el]
            a["leaf_items"][dest] = new_rows[el]
            if "row_slot" in a:
                self._move_slots(new_rows[el], tag[el], dest)
            a["leaf_count"][touched[fits]] += n_new[fits].astype(np.int32)
            self._update_leaf_stats(touched[fits])
        # 2) regrow the rest: old live items + new ones, split to <= leaf_size per leaf
        redo = ~fits
        if redo.any():
            lv = touched[redo]
            st, ct = a["leaf_start"][lv], a["leaf_count"][lv].astype(np.int64)
            old_at = _search.ragged_ranges(st, ct)
            old = a["leaf_items"][old_at].astype(np.int64)
            old_seg = np.repeat(np.arange(len(lv)), ct)
            el = np.repeat(redo, n_new)
            new_seg = np.repeat(np.arange(len(lv)), n_new[redo])
            all_rows = np.concatenate([old, new_rows[el]])
            all_seg = np.concatenate([old_seg, new_seg])
            all_old = np.concatenate([old_at, tag[el]])
            o = np.argsort(all_seg, kind="stable")
            all_rows, all_seg, all_old = all_rows[o], all_seg[o], all_old[o]
            seg_count = np.bincount(all_seg, minlength=len(lv))
            seg_start = np.cumsum(seg_count) - seg_count
            # one local index per (item, leaf) pair: a row can be in regrown leaves of several trees
            zl = items_to_routing(a["vectors"][all_rows], self.metric, self.ref_norm)
            local = np.arange(len(all_rows), dtype=np.int32)
            rng = np.random.default_rng([self.seed, self.n_adds + 1])
            self._regrow(lv, local, seg_start, seg_count, zl, rng, all_rows, tight=False, old_pos=all_old)
        self.n_adds += 1
        self._cache = {}
        self._maybe_compact()
        log.debug("added %d items in %.3fs (%d leaves regrown)", len(x), time.perf_counter() - t0, int(redo.sum()))

    def _place_rows(self, x: np.ndarray, norms: np.ndarray, id_arr: np.ndarray) -> np.ndarray:
        """Write new items into free rows (lowest first), then append the rest; returns their rows
        ``(m,) int64`` and records them in the id lookup. Amortised O(m * dim)."""
        a = self._arrays()
        free = self._free_rows()
        reuse, self._free = free[: len(x)], free[len(x) :]
        k = len(reuse)
        if k:
            self._lookup.snapshot(a["ids"])  # the base's keys, read before any of its rows changes id
            if a["ids"].dtype.kind == "U" and id_arr.dtype.itemsize > a["ids"].dtype.itemsize:
                self._reallocate("ids", len(a["ids"]), id_arr.dtype)  # wider strings: widen in place
                a["ids"] = self._buf["ids"][: len(a["ids"])]
            a["vectors"][reuse], a["norms"][reuse], a["ids"][reuse] = x[:k], norms[:k], id_arr[:k]
            a["alive"][reuse] = True
            if "row_slot" in a:
                a["row_slot"][reuse] = _slot_tags(self.n_trees)
        row0 = len(a["vectors"])
        if k < len(x):
            self._append("vectors", x[k:])
            self._append("norms", norms[k:])
            self._append("ids", id_arr[k:])
            self._append("alive", np.ones(len(x) - k, dtype=bool))
            if "row_slot" in a:
                self._append("row_slot", np.tile(_slot_tags(self.n_trees), (len(x) - k, 1)))
        rows = np.concatenate([reuse, np.arange(row0, row0 + len(x) - k, dtype=np.int64)])
        self._n_live += len(x)
        self._lookup.add(id_arr, rows)
        if self._lookup.needs_merge():
            self._merge_lookup()
        return rows

    def _free_rows(self) -> np.ndarray:
        """Sorted rows of removed items (in no leaf), reused by :meth:`add`."""
        if self._free is None:
            self._free = np.flatnonzero(~self._arrays()["alive"]).astype(np.int64)
        return self._free

    def remove(self, ids: Iterable[Any], *, missing_ok: bool = False) -> int:
        """Take items out (take-downs, replaced vectors): they are never returned again. Returns how
        many were removed.

        The items leave their leaves at once (each touched leaf is compacted in place, O(m *
        n_trees * leaf_size)); their rows are reused by later :meth:`add` calls, and when removed
        rows pile up (more than 25% of the rows) :meth:`compact` drops them. Unknown ids raise
        :class:`UnknownIdError` unless ``missing_ok``.
        """
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        rows, found = self._rows_of(arr.ravel())
        if not found.all() and not missing_ok:
            raise UnknownIdError(
                f"{int((~found).sum())} ids are not in the forest, e.g. "
                f"{arr.ravel()[~found][:3].tolist()}; pass missing_ok=True to ignore"
            )
        if not found.any():
            return 0
        self._prepare_mutation()
        a = self._arrays()
        rows = np.unique(rows[found])
        a["alive"][rows] = False
        self._purge_rows(rows)
        self._lookup.discard(a["ids"][rows])
        self._n_live -= len(rows)
        self._free = np.union1d(self._free_rows(), rows)
        self._cache = {}
        self._maybe_compact()
        return len(rows)

    # ------------------------------------------------------------------ slot maps and compaction
    def _slot_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """``row_slot (n_rows, n_trees)``: the ``leaf_items`` positions of each row (-1: none, in no
        fixed tree order) and ``slot_leaf (L,) int32``: the leaf owning each slot (-1: retired).

        Derived from the leaves on first use (O(L log L): after build, load or compaction), then
        kept up to date by add / remove, so removals find their slots in O(n_trees)."""
        a = self._arrays()
        if "row_slot" not in a:
            c = a["leaf_count"].astype(np.int64)
            pos = _search.ragged_ranges(a["leaf_start"], c)
            rows = a["leaf_items"][pos].astype(np.int64)
            o = np.argsort(rows, kind="stable")
            rows, pos = rows[o], pos[o]
            col = np.arange(len(rows)) - np.searchsorted(rows, rows)
            if len(col) and int(col.max()) >= self.n_trees:
                raise ForestError(f"corrupt forest: an item sits in more than n_trees={self.n_trees} leaves")
            row_slot = np.full((len(a["alive"]), self.n_trees), -1, dtype=_slot_dtype(len(a["leaf_items"])))
            row_slot[rows, col] = pos
            cap = a["leaf_cap"].astype(np.int64)
            live = np.flatnonzero(cap > 0)
            slot_leaf = np.full(len(a["leaf_items"]), -1, dtype=np.int32)
            slot_leaf[_search.ragged_ranges(a["leaf_start"][live], cap[live])] = np.repeat(live, cap[live])
            self._set("row_slot", row_slot)
            self._set("slot_leaf", slot_leaf)
        return a["row_slot"], a["slot_leaf"]

    def _move_slots(self, rows: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """Record that the slot ``old[i]`` (a position or a placeholder) of ``rows[i]`` is now ``new[i]``."""
        if not len(rows):
            return
        a = self._arrays()
        if a["row_slot"].dtype == np.int32 and _slot_dtype(len(a["leaf_items"])) is np.int64:
            self._set("row_slot", a["row_slot"].astype(np.int64))
        rs = a["row_slot"]
        if self.n_trees == 1:
            rs[rows, 0] = new
            return
        hit = rs[rows] == np.asarray(old)[:, None]
        col = np.argmax(hit, axis=1)
        if not hit[np.arange(len(rows)), col].all():
            raise ForestError("internal error: the forest's slot map lost track of an item (please report)")
        rs[rows, col] = new

    def _purge_rows(self, rows: np.ndarray) -> None:
        """Take the (already not alive) ``rows`` out of their leaves: each touched leaf keeps its
        live items in order, packed at its start; centroids and radii of the touched leaves are
        recomputed. O(len(rows) * n_trees * leaf_size)."""
        a = self._arrays()
        row_slot, slot_leaf = self._slot_maps()
        s = row_slot[rows].ravel()
        s = s[s >= 0]
        if not len(s):
            return
        leaves = np.unique(slot_leaf[s])
        st, ct = a["leaf_start"][leaves], a["leaf_count"][leaves].astype(np.int64)
        pos = _search.ragged_ranges(st, ct)
        items = a["leaf_items"][pos].astype(np.int64)
        keep = a["alive"][items]
        kc = np.bincount(np.repeat(np.arange(len(leaves)), ct)[keep], minlength=len(leaves))
        new_pos = _search.ragged_ranges(st, kc)
        kept, old_pos = items[keep], pos[keep]
        a["leaf_items"][new_pos] = kept
        moved = old_pos != new_pos
        self._move_slots(kept[moved], old_pos[moved], new_pos[moved])
        a["leaf_count"][leaves] = kc
        row_slot[items[~keep]] = -1
        self._update_leaf_stats(leaves[kc > 0])

    def _unused_slots(self) -> int:
        """Slots of ``leaf_items`` that belong to no leaf (retired by regrowth)."""
        a = self._arrays()
        return len(a["leaf_items"]) - int(a["leaf_cap"].sum(dtype=np.int64))

    def _maybe_compact(self) -> None:
        """Compact when dead rows or unused slots exceed their fraction (amortised O(1) per removal:
        a compaction costs O(n * dim + L) and follows at least ``_COMPACT_DEAD * n`` removals)."""
        a = self._arrays()
        dead = len(a["alive"]) - self._n_live
        unused = self._unused_slots()
        if (dead >= _COMPACT_MIN and dead > _COMPACT_DEAD * len(a["alive"])) or (
            unused >= _COMPACT_MIN and unused > _COMPACT_SLOTS * len(a["leaf_items"])
        ):
            self.compact()

    def compact(self) -> dict[str, int]:
        """Drop the rows of removed items and the unused ``leaf_items`` slots now, renumbering rows
        (order kept) and slots. Queries answer exactly as before. O(n * dim + L); runs by itself
        when dead rows exceed 25% of the rows or unused slots 50% of the slots.

        Returns ``{"rows_dropped": ..., "slots_dropped": ...}``."""
        t0 = time.perf_counter()
        self._prepare_mutation()
        self._merge_lookup()
        rows_dropped = self._compact_rows()
        slots_dropped = self._compact_slots()
        self._cache = {}
        self.compactions += 1
        log.info(
            "compacted forest: dropped %d dead rows and %d unused leaf slots in %.3fs (%d items, %d bytes held)",
            rows_dropped,
            slots_dropped,
            time.perf_counter() - t0,
            len(self),
            self.nbytes,
        )
        return {"rows_dropped": rows_dropped, "slots_dropped": slots_dropped}

    def _compact_rows(self) -> int:
        """Keep only alive rows (in order) in the row arrays; renumber leaves, lookup, slot maps."""
        a = self._arrays()
        keep = np.array(a["alive"], dtype=bool)
        n_old = len(keep)
        if keep.all():
            return 0
        new_of_old = np.full(n_old, -1, dtype=np.int64)
        new_of_old[keep] = np.arange(int(keep.sum()))
        for name in _ROW_ARRAYS + (("row_slot",) if "row_slot" in a else ()):
            self._set(name, a[name][keep])
        li = a["leaf_items"]
        out = np.full(len(li), -1, dtype=np.int32)
        ok = li >= 0  # slots beyond a leaf's count may hold stale rows: they are remapped or cleared
        out[ok] = new_of_old[li[ok]]
        self._set("leaf_items", out)
        self._set("lookup_rows", self._lookup.renumber(new_of_old))
        self._free = np.zeros(0, np.int64)
        return n_old - len(a["alive"])

    def _compact_slots(self) -> int:
        """Repack ``leaf_items`` to the leaves with capacity (in leaf order); retired leaves get start 0."""
        a = self._arrays()
        unused = self._unused_slots()
        if not unused:
            return 0
        cap = a["leaf_cap"].astype(np.int64)
        live = np.flatnonzero(cap > 0)
        old = _search.ragged_ranges(a["leaf_start"][live], cap[live])
        pos_map = np.full(len(a["leaf_items"]), -1, dtype=np.int64)
        pos_map[old] = np.arange(len(old))
        self._set("leaf_items", a["leaf_items"][old])
        start = np.zeros(len(cap), dtype=np.int64)
        start[live] = np.cumsum(cap[live]) - cap[live]
        a["leaf_start"][:] = start
        if "row_slot" in a:
            rs = a["row_slot"]
            has = rs >= 0
            rs[has] = pos_map[rs[has]]
            self._set("slot_leaf", a["slot_leaf"][old])
        return unused

    # ------------------------------------------------------------------ queries
    def _banned_keys(self, exclude: Any, nq: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Sorted keys ``row * n_rows + item`` of excluded live items, and per-query counts."""
        per_row = np.zeros(nq, dtype=np.int64)
        if exclude is None:
            return None, per_row
        if len(exclude) != nq:
            raise DimensionError(f"exclude must hold one iterable of ids per query ({nq}); got {len(exclude)}")
        lens, flat = [], []
        for e in exclude:
            lst = [] if e is None else list(e)
            lens.append(len(lst))
            flat.extend(lst)
        if not flat:
            return None, per_row
        rows, found = self._rows_of(np.asarray(flat))
        qrow = np.repeat(np.arange(nq), lens)
        n_rows = len(self._arrays()["vectors"])
        keys = np.unique(qrow[found] * n_rows + rows[found])
        per_row = np.bincount(keys // n_rows, minlength=nq)
        return keys, per_row

    def _use_scan(self, search_k: int) -> bool:
        """Whether queries with this ``search_k`` use the leaf scan (see ``search_mode``)."""
        if self.search_mode != "auto":
            return self.search_mode == "scan"
        if "live_leaves" not in self._cache:
            self._cache["live_leaves"] = int(np.count_nonzero(self._arrays()["leaf_count"]))
        return self.n_trees <= 2 or self._cache["live_leaves"] <= _SCAN_RATIO * search_k

    def _slots_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For item ``rows``: ``(which, leaf, col)`` = index into ``rows``, leaf and position in it.
        O(len(rows) * n_trees) with the slot maps (see :meth:`_slot_maps`)."""
        row_slot, slot_leaf = self._slot_maps()
        rs = row_slot[np.asarray(rows, dtype=np.int64)]
        which, _t = np.nonzero(rs >= 0)
        slot = rs[which, _t].astype(np.int64)
        leaf = slot_leaf[slot].astype(np.int64)
        return which, leaf, slot - self._arrays()["leaf_start"][leaf]

    def _rerank_terms(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-row ``(scale, bias)`` of the re-rank score (cosine: ``1/|y|``; euclidean: ``-|y|^2``)."""
        if "terms" not in self._cache:
            nrm = np.asarray(self._arrays()["norms"], dtype=np.float32)
            if self.metric == "cosine":
                inv = np.divide(1.0, nrm, out=np.zeros_like(nrm), where=nrm > 0)
                self._cache["terms"] = (inv, None)
            elif self.metric == "euclidean":
                self._cache["terms"] = (None, -(nrm * nrm))
            else:
                self._cache["terms"] = (None, None)
        return self._cache["terms"]

    def _scan_block(
        self,
        q: np.ndarray,
        qr: np.ndarray,
        k: int,
        search_k: int,
        banned: np.ndarray | None,
        alive: np.ndarray,
        kill: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Leaf-scan search of a query block (``search.scan_leaves`` + ``search.grouped_rerank``).

        1. rank leaves by centroid score, keep the best until ``search_k`` items per query;
        2. a lower bound ``tau`` of each query's k-th best eligible score from its best few leaves
           (a small gather); 3. score all (query, leaf) pairs leaf by leaf with one GEMM per leaf,
           keep only cells ``>= tau``; 4. best ``k`` distinct per query.
        """
        a = self._arrays()
        count = a["leaf_count"]
        if "scan" not in self._cache:  # only non-empty leaves are scored (refinement empties some)
            live = np.flatnonzero(count > 0)
            cent = np.ascontiguousarray(a["leaf_centroid"][live])
            bias = (_search.LEAF_RADIUS_WEIGHT * a["leaf_radius"][live]).astype(np.float32)
            cent_sq = np.einsum("ij,ij->i", cent, cent) if self.metric == "euclidean" else None
            self._cache["scan"] = (live, cent, bias, cent_sq, count[live].astype(np.int64))
        live, cent, bias, cent_sq, live_count = self._cache["scan"]
        mean_leaf = max(1.0, float(live_count.mean())) if len(live) else 1.0
        nq = len(q)
        if nq == 1 and self.n_trees == 1 and len(live):
            return self._scan_one(q, qr, k, search_k, banned, alive, kill, mean_leaf)
        pq, pl, prank = _search.scan_leaves(qr, cent, bias, cent_sq, live_count, search_k, mean_leaf)
        pl = live[pl]
        scale, rbias = self._rerank_terms()
        qop = q
        if self.metric == "euclidean":
            qop = np.concatenate([2.0 * q, np.ones((nq, 1), np.float32)], axis=1)
        n_rows = len(a["vectors"])
        # 2) tau: k-th best distinct eligible score among the items of each query's first leaves
        first = prank < max(2, int(np.ceil(_TAU_ITEMS * k / mean_leaf)))
        fq, fl = pq[first], pl[first]
        fc = count[fl].astype(np.int64)
        fpos = _search.ragged_ranges(a["leaf_start"][fl], fc)
        frows = a["leaf_items"][fpos].astype(np.int64)
        fqq = np.repeat(fq, fc)
        ok = alive[frows]
        if banned is not None and len(banned):
            key = fqq * n_rows + frows
            pos = np.minimum(np.searchsorted(banned, key), len(banned) - 1)
            ok &= banned[pos] != key
        fqq, frows = fqq[ok], frows[ok]
        fs = np.empty(len(frows), dtype=np.float32)
        step = 1 << 15  # small chunks: the gathered rows stay in cache (no fresh pages to fault in)
        for c0 in range(0, len(frows), step):
            c1 = c0 + step
            fs[c0:c1] = np.einsum(
                "ij,ij->i", _search.rerank_matrix(a["vectors"], frows[c0:c1], scale, rbias), qop[fqq[c0:c1]]
            )
        if self.n_trees == 1:  # distinct items: k-th best by a row-wise partition
            kth, tf = _search.kth_best(fqq, fs, nq, k)
        else:
            _ti, ts, tf = _search.topk_ragged(fqq, frows, fs, nq, k, self.n_trees)
            kth = ts[:, k - 1]
        # slack: the GEMM may round the same score differently than einsum
        low = np.finfo(np.float32).min
        tau = np.where(tf >= k, kth - (np.abs(kth) * 1e-4 + 1e-6), low).astype(np.float32)
        # 3) grouped re-rank, pairs sorted by leaf; cells of dead / excluded items are blanked
        # stable sort by leaf; numpy radix-sorts 16-bit keys (O(n)) when the leaves fit in 16 bits
        # leaves are ordered by size (``rank``) so that each re-rank chunk holds leaves of similar
        # sizes: its score buffer is padded to its own largest leaf, not to the largest of all
        if "leaf_rank" not in self._cache:
            # counts <= leaf_size: a 16-bit stable sort is numpy's O(n) radix sort (same order)
            small = self.leaf_size < 1 << 16
            by_size = np.argsort(count.astype(np.uint16) if small else count, kind="stable")
            rank = np.empty(len(count), dtype=np.int64)
            rank[by_size] = np.arange(len(count))
            self._cache["leaf_rank"] = rank
        rank = self._cache["leaf_rank"]
        rk = rank[pl]
        perm = np.argsort(rk.astype(np.uint16) if len(count) <= 1 << 16 else rk, kind="stable")
        spq, spl, srk = pq[perm], pl[perm], rk[perm]
        kp: list[np.ndarray] = []
        kc: list[np.ndarray] = []
        if len(kill):  # items in leaves that may not be returned (denied; removed, in old files)
            _w, leaf, col = self._slots_of(kill)
            lo = np.searchsorted(srk, rank[leaf], side="left")
            n = np.searchsorted(srk, rank[leaf], side="right") - lo
            kp.append(_search.ragged_ranges(lo, n))
            kc.append(np.repeat(col, n))
        if banned is not None and len(banned):
            w, leaf, col = self._slots_of(banned % n_rows)
            key = srk * nq + spq
            want = rank[leaf] * nq + (banned // n_rows)[w]
            if len(key):
                pos = np.minimum(np.searchsorted(key, want), len(key) - 1)
                hit = key[pos] == want
                kp.append(pos[hit])
                kc.append(col[hit])
        kill_pair = kill_col = None
        if kp:
            kill_pair, kill_col = np.concatenate(kp), np.concatenate(kc)
            o = np.argsort(kill_pair, kind="stable")
            kill_pair, kill_col = kill_pair[o], kill_col[o]
        sq, si, ss = _search.grouped_rerank(
            qop, spq, spl, tau, kill_pair, kill_col, a["leaf_start"], count, a["leaf_items"], a["vectors"], scale, rbias
        )
        return _search.topk_ragged(sq, si, ss, nq, k, self.n_trees)

    def _scan_one(
        self,
        q: np.ndarray,
        qr: np.ndarray,
        k: int,
        search_k: int,
        banned: np.ndarray | None,
        alive: np.ndarray,
        kill: np.ndarray,
        mean_leaf: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The leaf scan of one query ``q (1, dim)`` (one tree): the same leaves and candidates as
        :meth:`_scan_block` (best leaves by centroid score until ``search_k`` items, exact re-rank), with
        one product over the leaves, a partition and one gather instead of the batch path's grouped
        machinery, whose fixed cost is ~10x the work of a single query (the serving path answers one
        user per request)."""
        a = self._arrays()
        live, cent, bias, cent_sq, live_count = self._cache["scan"]
        if cent_sq is None:
            if "scan_op" not in self._cache:
                self._cache["scan_op"] = np.ascontiguousarray(np.concatenate([cent, bias[:, None]], axis=1))
            s = self._cache["scan_op"] @ np.append(qr[0], np.float32(1.0)).astype(np.float32)
        else:
            s = _search._leaf_scores(qr, cent, bias, cent_sq, np.empty((1, len(live)), np.float32))[0]
        n_leaf = len(s)
        r = min(n_leaf, int(2 * search_k / mean_leaf) + 8)
        while True:  # the best r leaves, best first; more when they hold fewer than search_k items
            top = np.argpartition(-s, r - 1)[:r] if r < n_leaf else np.arange(n_leaf)
            top = top[np.argsort(-s[top], kind="stable")]
            cnt = live_count[top]
            cum = np.cumsum(cnt)
            if cum[-1] >= search_k or r == n_leaf:
                break
            r = min(n_leaf, 4 * r)
        keep = top[((cum - cnt) < search_k) & (cnt > 0) & np.isfinite(s[top])]
        leaves = live[keep]
        rows = a["leaf_items"][_search.ragged_ranges(a["leaf_start"][leaves], a["leaf_count"][leaves])]
        rows = rows.astype(np.int64)
        ok = alive[rows]
        if len(kill):
            ok &= ~np.isin(rows, kill)
        if banned is not None and len(banned):
            ok &= ~np.isin(rows, banned[banned < len(alive)])  # query 0's keys are its rows
        rows = rows[ok]
        scale, rbias = self._rerank_terms()
        qop = q[0]
        if self.metric == "euclidean":
            qop = np.append(2.0 * q[0], np.float32(1.0)).astype(np.float32)
        scores = _search.rerank_matrix(a["vectors"], rows, scale, rbias) @ qop
        m = min(k, len(rows))
        out_i = np.full((1, k), -1, dtype=np.int64)
        out_s = np.full((1, k), _search.NEG_INF, dtype=np.float32)
        if m:
            best = np.argpartition(-scores, m - 1)[:m] if m < len(rows) else np.arange(len(rows))
            best = best[np.argsort(-scores[best], kind="stable")]
            out_i[0, :m] = rows[best]
            out_s[0, :m] = scores[best]
        return out_i, out_s, np.array([m], dtype=np.int64)

    def _search_block(
        self,
        q: np.ndarray,
        qr: np.ndarray,
        k: int,
        search_k: int,
        banned: np.ndarray | None,
        alive: np.ndarray,
        kill: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One block of queries; ``alive (n_rows,)``: eligible rows; ``kill``: the rows in leaves
        that are not eligible (denied ones; a forest saved by older code: also removed ones)."""
        if self._use_scan(search_k):
            return self._scan_block(q, qr, k, search_k, banned, alive, kill)
        a = self._arrays()
        mean_leaf = max(1.0, float(np.mean(a["leaf_count"][a["leaf_cap"] > 0])) if len(a["leaf_cap"]) else 1.0)
        beam = max(self.n_trees, int(np.ceil(self.beam_factor * search_k / mean_leaf)))
        lid, lp = _search.collect_leaves(qr, a["roots"], a["normals"], a["offsets"], a["children"], beam)
        cand, n_cand = _search.gather_candidates(
            lid,
            lp,
            a["leaf_start"],
            a["leaf_count"],
            a["leaf_items"],
            search_k,
            max_leaves=max(beam, int(np.ceil(2 * search_k / mean_leaf))),
        )
        raw = _search.rerank_scores(a["vectors"], cand, q)
        if self.metric == "cosine":
            nrm = a["norms"][cand]
            raw = np.divide(raw, nrm, out=np.zeros_like(raw), where=nrm > 0)
        elif self.metric == "euclidean":
            nrm = a["norms"][cand]
            raw = 2.0 * raw - nrm * nrm
        valid = (np.arange(cand.shape[1])[None, :] < n_cand[:, None]) & alive[cand]
        scores = np.where(valid, raw, _search.NEG_INF)
        return _search.topk_distinct(scores, cand, k, banned, len(a["vectors"]), start_m=k * 8)

    def _exact_block(
        self, q: np.ndarray, k: int, rows_q: np.ndarray, banned: np.ndarray | None, alive: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Brute-force fallback for queries that the forest could not serve ``k`` results."""
        a = self._arrays()
        raw = q @ a["vectors"].T
        if self.metric == "cosine":
            raw = np.divide(raw, a["norms"], out=np.zeros_like(raw), where=a["norms"] > 0)
        elif self.metric == "euclidean":
            raw = 2.0 * raw - a["norms"] ** 2
        scores = np.where(alive[None, :], raw, _search.NEG_INF).astype(np.float32)
        cand = np.broadcast_to(np.arange(len(alive), dtype=np.int32), scores.shape)
        keys = self._pick_banned(banned, rows_q, len(alive))
        return _search.topk_distinct(scores, cand, k, keys, len(alive), start_m=k * 8)

    def _final_scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact metric values ``(nq, k)`` for returned rows (``-1`` rows get the padding value)."""
        a = self._arrays()
        ok = rows >= 0
        v = a["vectors"][np.where(ok, rows, 0)]
        if self.metric == "euclidean":
            s = np.sqrt(np.einsum("qkd,qkd->qk", v - q[:, None, :], v - q[:, None, :]))
            return np.where(ok, s, np.inf).astype(np.float32)
        s = np.einsum("qkd,qd->qk", v, q)
        if self.metric == "cosine":
            den = a["norms"][np.where(ok, rows, 0)] * np.linalg.norm(q, axis=1)[:, None]
            s = np.divide(s, den, out=np.zeros_like(s), where=den > 0)
        return np.where(ok, s, -np.inf).astype(np.float32)

    def query_batch(
        self,
        queries: np.ndarray,
        k: int = 10,
        search_k: int | None = None,
        exclude: Sequence[Iterable[Any] | None] | None = None,
        *,
        deny: Iterable[Any] | None = None,
        batch_size: int | None = None,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items for each row of ``queries (nq, dim)``.

        ``search_k``: candidates (counting duplicates across trees) collected before the exact
        re-rank; default :attr:`default_search_k` when calibrated (``index.calibrate``), else
        ``max(20 * k * n_trees, 1000 * k)``, or ``200 * k`` for refined leaves. ``exact``: answer by
        brute force over every eligible item instead (the reference recall is measured against).
        ``exclude``: one iterable of ids per query (or ``None``); ``deny``: ids excluded for every
        query. Unknown ids in both are ignored.

        Returns ``ids (nq, k)`` best first and ``scores (nq, k) float32`` (exact dot / cosine /
        euclidean distance). Fewer than ``k`` eligible items: ids are padded with ``""`` (str ids)
        or ``-1`` (int ids) and scores with ``-inf`` (dot, cosine) or ``+inf`` (euclidean).
        If the forest's candidates hold fewer than ``k`` eligible items while more exist, the query
        is retried with 4x ``search_k`` and finally answered exactly by brute force.
        ``batch_size``: queries searched together (default 256, or 4096 in leaf-scan mode).
        """
        a = self._arrays()
        q = _as_matrix(queries, self.dim, "queries")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        if search_k is None:
            search_k = self.default_search_k
        if search_k is None:  # refined leaves need ~10x fewer candidates (recall ~0.98 at 200 k at 1M items)
            search_k = max(20 * k * self.n_trees, (200 if self.refine else 1000) * k)
        search_k = int(search_k)
        if search_k < 1:
            raise ValueError(f"search_k must be >= 1; got {search_k}")
        nq = len(q)
        banned, n_banned = self._banned_keys(exclude, nq)
        alive = a["alive"]
        kill = np.zeros(0, dtype=np.int64)
        if deny is not None:
            drows, dfound = self._rows_of(np.asarray(list(deny)))
            if dfound.any():
                kill = np.unique(drows[dfound])
                alive = alive.copy()
                alive[kill] = False
        n_eligible = len(self) - len(kill)
        if self._dead_in_leaves:
            kill = np.union1d(kill, np.flatnonzero(~a["alive"]))
        want = np.minimum(k, np.maximum(n_eligible - n_banned, 0))
        qr = queries_to_routing(q, self.metric)
        rows = np.full((nq, k), -1, dtype=np.int64)
        if exact:  # score blocks of at most ~16M cells
            batch_size = max(1, (1 << 24) // max(len(alive), 1))
        elif batch_size is None:
            batch_size = _SCAN_BLOCK if self._use_scan(search_k) else 256
        for b0 in range(0, nq, batch_size):
            b1 = min(b0 + batch_size, nq)
            if exact:
                rows[b0:b1] = self._exact_block(q[b0:b1], k, np.arange(b0, b1), banned, alive)[0]
                continue
            sub = self._sub_banned(banned, b0, b1, len(alive))
            r, _, found = self._search_block(q[b0:b1], qr[b0:b1], k, search_k, sub, alive, kill)
            rows[b0:b1] = r
            short = np.flatnonzero(found < want[b0:b1])
            sk = search_k
            for _ in range(2):
                if not len(short):
                    break
                sk *= 4
                qi = short + b0
                sub = self._pick_banned(banned, qi, len(alive))
                r, _, found = self._search_block(q[qi], qr[qi], k, sk, sub, alive, kill)
                rows[qi] = r
                short = short[found < want[qi]]
            if len(short):
                qi = short + b0
                log.debug("exact fallback for %d queries", len(qi))
                r, _, _ = self._exact_block(q[qi], k, qi, banned, alive)
                rows[qi] = r
        scores = self._final_scores(q, rows)
        if self.metric == "euclidean":  # exact distances may reorder float32 near-ties
            o = np.argsort(scores, axis=1, kind="stable")
        else:
            o = np.argsort(-scores, axis=1, kind="stable")
        rows = np.take_along_axis(rows, o, axis=1)
        scores = np.take_along_axis(scores, o, axis=1)
        ids = a["ids"][np.where(rows >= 0, rows, 0)]
        pad = "" if self.id_kind == "str" else -1
        ids = np.where(rows >= 0, ids, np.asarray(pad, dtype=ids.dtype))
        return ids, scores

    @staticmethod
    def _sub_banned(banned: np.ndarray | None, b0: int, b1: int, n_rows: int) -> np.ndarray | None:
        if banned is None:
            return None
        lo, hi = np.searchsorted(banned, [b0 * n_rows, b1 * n_rows])
        return banned[lo:hi] - b0 * n_rows

    @staticmethod
    def _pick_banned(banned: np.ndarray | None, qi: np.ndarray, n_rows: int) -> np.ndarray | None:
        if banned is None:
            return None
        qrow = banned // n_rows
        pos = np.searchsorted(qi, qrow)
        hit = (pos < len(qi)) & (qi[np.minimum(pos, len(qi) - 1)] == qrow)
        return np.sort(pos[hit] * n_rows + banned[hit] % n_rows)

    def query(
        self,
        vector: np.ndarray,
        k: int = 10,
        search_k: int | None = None,
        exclude: Iterable[Any] | None = None,
        *,
        deny: Iterable[Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` for one ``vector (dim,)``; returns ``ids (k,)``, ``scores (k,)``."""
        v = np.asarray(vector, dtype=np.float32)
        if v.shape != (self.dim,):
            raise DimensionError(f"vector must have shape ({self.dim},); got {v.shape}")
        ex = None if exclude is None else [exclude]
        ids, scores = self.query_batch(v[None, :], k=k, search_k=search_k, exclude=ex, deny=deny)
        return ids[0], scores[0]

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "metric": self.metric,
            "n_trees": self.n_trees,
            "leaf_size": self.leaf_size,
            "seed": self.seed,
            "beam_factor": self.beam_factor,
            "sample": self.sample,
            "iters": self.iters,
            "balance": self.balance,
            "search_mode": self.search_mode,
            "refine": self.refine,
            "ref_norm": self.ref_norm,
            "n_adds": self.n_adds,
            "default_search_k": self.default_search_k,
            # removed items are out of the leaves (older files may still hold them there, masked)
            "leaves_hold_live_items_only": not self._dead_in_leaves,
        }

    def save(self, directory: str | os.PathLike[str], prefix: str = "forest") -> list[Path]:
        """Write plain ``.npy`` arrays and ``<prefix>.json`` into ``directory``; returns the paths.

        Only the used rows are written (not the spare capacity); the id lookup's recent inserts are
        merged into ``lookup_rows`` first. Rows of removed items are written with ``alive`` false."""
        self._merge_lookup()
        paths = save_arrays(directory, prefix, self._arrays(), self._meta())
        log.info("saved forest (%d items, %d bytes) to %s/%s.*", len(self), self.nbytes, directory, prefix)
        return paths

    @classmethod
    def load(cls, directory: str | os.PathLike[str], prefix: str = "forest", mmap: bool = True) -> HyperplaneForest:
        """Open a saved forest; with ``mmap`` the arrays are read-only views of memory-mapped files.

        ``add``/``remove`` on a memory-mapped forest first copy the arrays into memory.
        """
        arrays, meta = load_arrays(directory, prefix, mmap)
        f = cls(
            meta["dim"],
            meta["metric"],
            meta["n_trees"],
            meta["leaf_size"],
            meta["seed"],
            beam_factor=meta["beam_factor"],
            sample=meta["sample"],
            iters=meta["iters"],
            balance=meta["balance"],
            search_mode=meta.get("search_mode", "auto"),
            refine=int(meta.get("refine", 0)),  # files written before refinement: plain tree leaves
        )
        f.ref_norm = float(meta["ref_norm"])
        f.n_adds = int(meta["n_adds"])
        default_k = meta.get("default_search_k")  # absent in files written before calibration
        f.default_search_k = None if default_k is None else int(default_k)
        f._a = dict(arrays)
        f._mutable = not mmap
        if "leaf_centroid" not in f._a:  # format version 1: derive the leaf statistics in memory
            n_leaf, rdim = len(f._a["leaf_count"]), routing_dim(f.metric, f.dim)
            f._a["leaf_centroid"] = np.zeros((n_leaf, rdim), np.float32)
            f._a["leaf_radius"] = np.zeros(n_leaf, np.float32)
            f._update_leaf_stats(np.arange(n_leaf))
        if not mmap:
            f._buf = dict(f._a)
        f._n_live = len(f._a["lookup_rows"])
        f._lookup = IdLookup(f._a["lookup_rows"])
        f._free = None  # derived from alive on the first add
        f._dead_in_leaves = not meta.get("leaves_hold_live_items_only", False) and not bool(f._a["alive"].all())
        return f
