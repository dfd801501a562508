"""The ANN libraries the forest is measured against, behind one small interface (benchmarks only).

Every index here answers top-``K`` for float32 queries, single-threaded, with one search knob per
measured point:

- ``forest``: playrec's ``HyperplaneForest`` (one tree, Lloyd-refined leaves, leaf scan), knob
  ``search_k``;
- ``scann``: ScaNN's tree + anisotropic hashing (4-bit, 2 dims per block) + exact float reorder,
  knob ``(leaves_to_search, pre_reorder_num_neighbors)``;
- ``faiss-ivfpq-fs``: FAISS ``IndexIVFPQFastScan`` (4-bit PQ, 2 dims per sub-quantizer) wrapped in
  ``IndexRefineFlat`` (exact re-rank), knob ``(nprobe, k_factor)``;
- ``faiss-hnsw``: FAISS ``IndexHNSWFlat`` (M 32), knob ``efSearch``;
- ``hnswlib``: M 16, knob ``ef``;
- ``annoy``: ``n_trees`` trees, knob ``search_k``.

Cosine for the peers that have no cosine metric (ScaNN, FAISS): items and queries are L2-normalised
and searched by inner product, which ranks exactly as cosine. Built indexes of the slow builds
(hnswlib, FAISS HNSW) are cached in the temp directory (by data key), so a rerun times the searches
only; ``build_s`` then reports the cached build's seconds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

K = 10
CACHE = Path(tempfile.gettempdir())


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows of ``x (n, d)`` scaled to unit length (zero rows stay zero), float32."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-30)).astype(np.float32)


def dir_bytes(save: Callable[[str], Any]) -> int:
    """Bytes of what ``save(directory)`` writes into an empty temporary directory."""
    with tempfile.TemporaryDirectory() as d:
        save(d)
        return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


@dataclass
class Peer:
    """One built index: ``batch(q (nq, d), knob) -> ids (nq, K)``, ``one(v (d,), knob) -> ids (K,)``.

    ``batch`` is ``None`` for libraries without a batch call (annoy); ``adds`` says what the library
    does with items added after the build."""

    name: str
    knobs: Sequence[Any]
    build_s: float
    nbytes: int
    one: Callable[[np.ndarray, Any], np.ndarray]
    batch: Callable[[np.ndarray, Any], np.ndarray] | None
    adds: str = ""
    index: Any = field(default=None, repr=False)


def _padded(ids: Sequence[int]) -> np.ndarray:
    a = np.asarray(list(ids), dtype=np.int64)[:K]
    return np.pad(a, (0, K - len(a)), constant_values=-1)


def forest(x: np.ndarray, metric: str, knobs: Sequence[int], leaf_size: int = 96, refine: int | None = None) -> Peer:
    from index import HyperplaneForest

    t0 = time.perf_counter()
    f = HyperplaneForest(x.shape[1], metric, n_trees=1, leaf_size=leaf_size, seed=0, refine=refine).build(
        x, np.arange(len(x))
    )
    build = time.perf_counter() - t0
    return Peer(
        f"forest-1x{leaf_size}" + ("" if f.refine else " unrefined"),
        list(knobs),
        build,
        f.nbytes,
        lambda v, sk: f.query(v, k=K, search_k=sk)[0],
        lambda q, sk: f.query_batch(q, k=K, search_k=sk)[0],
        "add(): new items go to the leaf with the nearest centroid, exact vectors, no retraining; remove() too",
        f,
    )


def scann(x: np.ndarray, metric: str, knobs: Sequence[tuple[int, int]], num_leaves: int | None = None) -> Peer:
    import scann as _scann

    db = normalised(x) if metric == "cosine" else x
    n = len(db)
    leaves = num_leaves or max(16, int(2 * np.sqrt(n)))
    t0 = time.perf_counter()
    b = _scann.scann_ops_pybind.builder(db, K, "dot_product").set_n_training_threads(1)
    b = b.tree(num_leaves=leaves, num_leaves_to_search=knobs[0][0], training_sample_size=min(n, 250_000))
    b = b.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(max(k for _, k in knobs))
    s = b.build()
    build = time.perf_counter() - t0
    s.set_num_threads(1)
    size = dir_bytes(lambda d: s.serialize(d))

    def one(v: np.ndarray, knob: tuple[int, int]) -> np.ndarray:
        v = normalised(v[None])[0] if metric == "cosine" else v
        return _padded(s.search(v, K, knob[1], knob[0])[0])

    def batch(q: np.ndarray, knob: tuple[int, int]) -> np.ndarray:
        q = normalised(q) if metric == "cosine" else q
        return np.asarray(s.search_batched(q, K, knob[1], knob[0])[0], dtype=np.int64)

    return Peer(
        f"scann (leaves {leaves})",
        list(knobs),
        build,
        size,
        one,
        batch,
        "upsert(): new points are quantised with the trained codebooks and partitions (drift until rebalance())",
        s,
    )


def faiss_ivfpq(x: np.ndarray, metric: str, knobs: Sequence[tuple[int, int]], nlist: int | None = None) -> Peer:
    import faiss

    faiss.omp_set_num_threads(1)
    db = normalised(x) if metric == "cosine" else np.ascontiguousarray(x)
    n, d = db.shape
    nlist = nlist or max(16, int(4 * np.sqrt(n)))
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFPQFastScan(quantizer, d, nlist, d // 2, 4, faiss.METRIC_INNER_PRODUCT)
    sample = db[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)]
    ivf.train(sample)
    index = faiss.IndexRefineFlat(ivf)
    index.add(db)
    build = time.perf_counter() - t0
    size = len(faiss.serialize_index(index))

    def batch(q: np.ndarray, knob: tuple[int, int]) -> np.ndarray:
        q = normalised(q) if metric == "cosine" else np.ascontiguousarray(q)
        ivf_params = faiss.SearchParametersIVF(nprobe=knob[0])
        params = faiss.IndexRefineSearchParameters(k_factor=knob[1], base_index_params=ivf_params)
        return index.search(q, K, params=params)[1].astype(np.int64)

    return Peer(
        f"faiss-ivfpq-fs (nlist {nlist})",
        list(knobs),
        build,
        size,
        lambda v, knob: batch(v[None], knob)[0],
        batch,
        "add(): new vectors are encoded with the trained coarse quantizer and PQ codebooks (drift until retrained)",
        (index, ivf),  # the refine index does not own its base
    )


def _cached_build(key: str, load: Callable[[Path], Any], build: Callable[[], Any], save: Callable[[Any, Path], None]):
    """``(index, build_s)``: from ``CACHE/<key>`` (with its recorded build seconds) or built and saved."""
    path, meta = CACHE / key, CACHE / f"{key}.json"
    if path.exists() and meta.exists():
        return load(path), float(json.loads(meta.read_text())["build_s"])
    t0 = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - t0
    save(index, path)
    meta.write_text(json.dumps({"build_s": build_s}))
    return index, build_s


def faiss_hnsw(x: np.ndarray, metric: str, knobs: Sequence[int], key: str, m: int = 32, efc: int = 100) -> Peer:
    import faiss

    faiss.omp_set_num_threads(1)
    db = normalised(x) if metric == "cosine" else np.ascontiguousarray(x)

    def build() -> Any:
        index = faiss.IndexHNSWFlat(db.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = efc
        index.add(db)
        return index

    index, build_s = _cached_build(
        f"peer_faiss_hnsw_{key}_{metric}_M{m}_efc{efc}.faiss",
        lambda p: faiss.read_index(str(p)),
        build,
        lambda i, p: faiss.write_index(i, str(p)),
    )
    size = (CACHE / f"peer_faiss_hnsw_{key}_{metric}_M{m}_efc{efc}.faiss").stat().st_size

    def batch(q: np.ndarray, ef: int) -> np.ndarray:
        q = normalised(q) if metric == "cosine" else np.ascontiguousarray(q)
        return index.search(q, K, params=faiss.SearchParametersHNSW(efSearch=ef))[1].astype(np.int64)

    return Peer(
        f"faiss-hnsw (M {m}, efc {efc})",
        list(knobs),
        build_s,
        size,
        lambda v, ef: batch(v[None], ef)[0],
        batch,
        "add(): graph insert of exact vectors, no removal",
        index,
    )


def hnswlib_index(x: np.ndarray, metric: str, knobs: Sequence[int], key: str, m: int = 16, efc: int = 100) -> Peer:
    import hnswlib

    space = "ip" if metric == "dot" else "cosine"

    def build() -> Any:
        h = hnswlib.Index(space=space, dim=x.shape[1])
        h.init_index(max_elements=len(x), ef_construction=efc, M=m, random_seed=0)
        h.add_items(x, np.arange(len(x)), num_threads=1)
        return h

    def load(p: Path) -> Any:
        h = hnswlib.Index(space=space, dim=x.shape[1])
        h.load_index(str(p), max_elements=len(x))
        return h

    name = f"peer_hnswlib_{key}_{metric}_M{m}_efc{efc}.bin"
    h, build_s = _cached_build(name, load, build, lambda i, p: i.save_index(str(p)))

    def one(v: np.ndarray, ef: int) -> np.ndarray:
        h.set_ef(max(ef, K))
        return h.knn_query(v[None], k=K, num_threads=1)[0][0].astype(np.int64)

    def batch(q: np.ndarray, ef: int) -> np.ndarray:
        h.set_ef(max(ef, K))
        return h.knn_query(q, k=K, num_threads=1)[0].astype(np.int64)

    return Peer(
        f"hnswlib (M {m}, efc {efc})",
        list(knobs),
        build_s,
        (CACHE / name).stat().st_size,
        one,
        batch,
        "add_items(): graph insert of exact vectors; mark_deleted() hides items",
        h,
    )


def annoy_index(x: np.ndarray, metric: str, knobs: Sequence[int], trees: int = 50) -> Peer:
    import annoy

    a = annoy.AnnoyIndex(x.shape[1], "dot" if metric == "dot" else "angular")
    t0 = time.perf_counter()
    for i, v in enumerate(x):
        a.add_item(i, v)
    a.build(trees, n_jobs=1)
    build = time.perf_counter() - t0
    size = dir_bytes(lambda d: a.save(os.path.join(d, "a.ann")))
    return Peer(
        f"annoy ({trees} trees)",
        list(knobs),
        build,
        size,
        lambda v, sk: _padded(a.get_nns_by_vector(v, K, search_k=sk)),
        None,
        "none: an annoy index is immutable once built",
        a,
    )
