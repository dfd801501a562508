"""Save and load forest arrays as plain ``.npy`` files plus one JSON metadata file.

Layout inside ``directory`` for ``prefix="forest"``: ``forest.json`` (metadata, written last) and
``forest.<name>.npy`` for every array in :data:`ARRAY_NAMES`. Files are written to a temporary
name and renamed, so a reader never sees a half-written array. Loading uses
``np.load(mmap_mode="r", allow_pickle=False)``: many processes can share one page-cache copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StorageError

FORMAT = "playrec-hyperplane-forest"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
NEW_IN_V2 = ("leaf_centroid", "leaf_radius")  # leaf statistics; recomputed when loading version 1
ARRAY_NAMES = (
    "vectors",
    "norms",
    "ids",
    "alive",
    "lookup_rows",
    "normals",
    "offsets",
    "children",
    "roots",
    "leaf_start",
    "leaf_count",
    "leaf_cap",
    "leaf_parent",
    "leaf_items",
    "leaf_centroid",
    "leaf_radius",
)


def _paths(directory: Path, prefix: str) -> tuple[Path, dict[str, Path]]:
    return directory / f"{prefix}.json", {n: directory / f"{prefix}.{n}.npy" for n in ARRAY_NAMES}


def save_arrays(
    directory: str | os.PathLike[str], prefix: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> list[Path]:
    """Write ``arrays`` (keys = :data:`ARRAY_NAMES`) and ``meta``; return the written paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta_path, paths = _paths(d, prefix)
    written = []
    for name in ARRAY_NAMES:
        arr = np.ascontiguousarray(arrays[name])
        if arr.dtype == object:
            raise StorageError(f"array {name!r} has dtype object; only plain dtypes can be saved")
        tmp = paths[name].with_name(paths[name].name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, paths[name])
        written.append(paths[name])
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "arrays": {n: {"shape": list(arrays[n].shape), "dtype": str(arrays[n].dtype)} for n in ARRAY_NAMES},
    }
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(full, indent=1, sort_keys=True))
    os.replace(tmp, meta_path)
    written.append(meta_path)
    return written


def load_arrays(
    directory: str | os.PathLike[str], prefix: str, mmap: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_arrays` wrote; with ``mmap`` the arrays are read-only ndarray views of
    memory-mapped files (``arr.base`` is the ``np.memmap``)."""
    d = Path(directory)
    meta_path, paths = _paths(d, prefix)
    if not meta_path.is_file():
        raise StorageError(f"no forest metadata at {meta_path}; was it saved with prefix={prefix!r}?")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise StorageError(f"corrupt forest metadata {meta_path}: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise StorageError(
            f"{meta_path} has format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}; expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    arrays = {}
    for name, path in paths.items():
        if meta["format_version"] == 1 and name in NEW_IN_V2:
            continue
        if not path.is_file():
            raise StorageError(f"forest array file missing: {path}")
        try:
            # a plain ndarray view of the mapping: np.memmap's subclass hooks cost a Python call per
            # slice or take (~2 us), which small queries make hundreds of times
            arr = np.asarray(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
        except ValueError:  # empty arrays cannot be memory-mapped
            arr = np.load(path, allow_pickle=False)
        want = meta["arrays"][name]
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            raise StorageError(
                f"{path} has shape {arr.shape} dtype {arr.dtype}; metadata says {tuple(want['shape'])} {want['dtype']}"
            )
        arrays[name] = arr
    return arrays, meta
