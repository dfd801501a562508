"""The model store: versioned model directories, published atomically (DESIGN.md section 3).

Layout (maps one-to-one onto object-storage keys)::

    STORE/models/<version>/manifest.json       version, created_at, parameters, watermark, rows,
                                                metrics, sha256 + size of every other file
    STORE/models/<version>/user_ids.npy        unicode (n_users,)
    STORE/models/<version>/item_ids.npy        unicode (n_items,)
    STORE/models/<version>/user_factors.npy    float32 (n_users, k), rows aligned with user_ids
    STORE/models/<version>/item_factors.npy    float32 (n_items, k), rows aligned with item_ids
    STORE/models/<version>/...                 further artifacts (the forest's arrays, reports)
    STORE/models/CURRENT                       the live version's name

Publishing writes into `models/.tmp-*`, fsyncs every file, renames the directory into place, then
swaps CURRENT by an atomic rename: a reader sees the old or the new model, never a part. Old
versions beyond `keep` are deleted (never the live one). Loading verifies every checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
FORMAT_VERSION = 1
REQUIRED_ARRAYS = ("user_ids", "item_ids", "user_factors", "item_factors")
_VERSION_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{6}$")


class ModelStoreError(RuntimeError):
    """The store is missing, empty or inconsistent."""


class ModelCorruptError(ModelStoreError):
    """A model version fails verification (missing file, wrong checksum, bad arrays)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_version_name(now: float | None = None) -> str:
    """A sortable, unique version name such as `20261127T020512.123456Z-3fa2c1`."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return f"{stamp:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(3)}"


@dataclass
class Model:
    """A loaded model version. Arrays may be read-only memory maps shared between processes."""

    version: str
    path: Path
    manifest: dict[str, Any]
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    _user_index: dict[str, int] | None = field(default=None, repr=False)
    _item_index: dict[str, int] | None = field(default=None, repr=False)

    @property
    def factors(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def user_index(self) -> dict[str, int]:
        """Map user id -> row of user_factors (built on first use)."""
        if self._user_index is None:
            self._user_index = {str(u): i for i, u in enumerate(self.user_ids.tolist())}
        return self._user_index

    @property
    def item_index(self) -> dict[str, int]:
        """Map track id -> row of item_factors (built on first use)."""
        if self._item_index is None:
            self._item_index = {str(t): i for i, t in enumerate(self.item_ids.tolist())}
        return self._item_index

    def artifact(self, name: str) -> Path:
        """Path of a further file of this version (e.g. the forest's arrays)."""
        return self.path / name


class ModelStore:
    """A directory of model versions with an atomically swapped CURRENT pointer."""

    def __init__(self, root: str | Path, keep: int = 5) -> None:
        if keep < 1:
            raise ModelStoreError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.models = self.root / "models"
        self.keep = keep

    # -- reading -----------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        if not self.models.is_dir():
            return []
        return sorted(p.name for p in self.models.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))

    def current_version(self) -> str:
        """The live version named by CURRENT."""
        pointer = self.models / CURRENT
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ModelStoreError(
                f"no model published in {self.root}: {pointer} is missing (run `playrec train --out {self.root}`)"
            ) from None
        if not _VERSION_RE.match(version) or not (self.models / version).is_dir():
            raise ModelStoreError(f"{pointer} names {version!r}, which is not a model version in {self.models}")
        return version

    def read_manifest(self, version: str) -> dict[str, Any]:
        path = self.models / version / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelCorruptError(f"{path} is missing") from None
        except json.JSONDecodeError as exc:
            raise ModelCorruptError(f"{path} is not valid JSON: {exc}") from None
        if manifest.get("version") != version:
            raise ModelCorruptError(f"{path} describes version {manifest.get('version')!r}, not {version!r}")
        return manifest

    def verify(self, version: str) -> dict[str, Any]:
        """Check every file of a version against its manifest checksum; returns the manifest."""
        manifest = self.read_manifest(version)
        directory = self.models / version
        files = manifest.get("files", {})
        for name in REQUIRED_ARRAYS:
            if f"{name}.npy" not in files:
                raise ModelCorruptError(f"{directory}: manifest lists no {name}.npy")
        for name, meta in files.items():
            path = directory / name
            if not path.is_file():
                raise ModelCorruptError(f"{path} is missing")
            if path.stat().st_size != meta["bytes"]:
                raise ModelCorruptError(f"{path} has {path.stat().st_size} bytes, manifest says {meta['bytes']}")
            if _sha256(path) != meta["sha256"]:
                raise ModelCorruptError(f"{path} fails its sha256 checksum: the model is damaged; republish it")
        return manifest

    def load(self, version: str | None = None, mmap: bool = True, verify: bool = True) -> Model:
        """Load a version (default: CURRENT); arrays are memory-mapped read-only when `mmap`."""
        version = version or self.current_version()
        manifest = self.verify(version) if verify else self.read_manifest(version)
        directory = self.models / version
        arrays = {}
        for name in REQUIRED_ARRAYS:
            try:
                arrays[name] = np.load(directory / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            except ValueError as exc:
                raise ModelCorruptError(f"{directory / name}.npy cannot be read: {exc}") from None
        model = Model(version=version, path=directory, manifest=manifest, **arrays)
        _check_shapes(model)
        return model

    # -- writing -----------------------------------------------------------------------------
    def publish(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        manifest: dict[str, Any] | None = None,
        extra: Callable[[Path], dict[str, Any] | None] | None = None,
        version: str | None = None,
        make_current: bool = True,
    ) -> str:
        """Write a new version atomically and (by default) make it CURRENT; returns its name.

        manifest: extra manifest fields (parameters, metrics, watermark, ...).
        extra(directory): writes further artifacts (e.g. the forest) into the staging directory and may
        return manifest fields to merge.
        """
        version = version or new_version_name()
        if not _VERSION_RE.match(version):
            raise ModelStoreError(f"invalid version name {version!r}")
        self.models.mkdir(parents=True, exist_ok=True)
        staging = self.models / f".tmp-{version}"
        staging.mkdir()
        try:
            arrays = {
                "user_ids": np.asarray(user_ids).astype(str),
                "item_ids": np.asarray(item_ids).astype(str),
                "user_factors": np.ascontiguousarray(user_factors, dtype=np.float32),
                "item_factors": np.ascontiguousarray(item_factors, dtype=np.float32),
            }
            model = Model(version, staging, {}, **arrays)
            _check_shapes(model)
            for name, array in arrays.items():
                np.save(staging / f"{name}.npy", array, allow_pickle=False)
            body: dict[str, Any] = dict(manifest or {})
            if extra is not None:
                body.update(extra(staging) or {})
            body.update(
                format=FORMAT_VERSION,
                version=version,
                created_at=datetime.now(timezone.utc).isoformat(),
                rows={"users": len(arrays["user_ids"]), "items": len(arrays["item_ids"])},
                factors=int(arrays["item_factors"].shape[1]),
                files={},
            )
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    _fsync_file(path)
                    body["files"][str(path.relative_to(staging))] = {
                        "sha256": _sha256(path),
                        "bytes": path.stat().st_size,
                    }
            manifest_path = staging / MANIFEST
            manifest_path.write_text(json.dumps(body, indent=2, sort_keys=True, default=_json_default), "utf-8")
            _fsync_file(manifest_path)
            _fsync_dir(staging)
            os.rename(staging, self.models / version)
            _fsync_dir(self.models)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("published model %s to %s", version, self.models)
        if make_current:
            self.set_current(version)
        self.prune()
        return version

    def set_current(self, version: str) -> None:
        """Atomically point CURRENT at an existing version."""
        if not (self.models / version).is_dir():
            raise ModelStoreError(f"cannot make {version!r} current: no such version in {self.models}")
        tmp = self.models / f".{CURRENT}.{secrets.token_hex(4)}"
        tmp.write_text(version + "\n", encoding="utf-8")
        _fsync_file(tmp)
        os.replace(tmp, self.models / CURRENT)
        _fsync_dir(self.models)
        log.info("CURRENT -> %s", version)

    def prune(self) -> list[str]:
        """Delete the oldest versions beyond `keep` (never CURRENT) and stale staging dirs; returns removed."""
        try:
            live = self.current_version()
        except ModelStoreError:
            live = None
        versions = self.versions()
        removed = [v for v in versions[: max(0, len(versions) - self.keep)] if v != live]
        for version in removed:
            shutil.rmtree(self.models / version, ignore_errors=True)
            log.info("pruned model %s (keeping %d)", version, self.keep)
        for stale in [*self.models.glob(".tmp-*"), *self.models.glob(f".{CURRENT}.*")]:
            # Staging directories and CURRENT temporaries left by a killed publisher; a live
            # publisher's are newer than a minute.
            with contextlib.suppress(FileNotFoundError):
                if time.time() - stale.stat().st_mtime > 60:
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink()
        return removed


def _check_shapes(model: Model) -> None:
    where = model.path
    for name in ("user_ids", "item_ids"):
        array = getattr(model, name)
        if array.ndim != 1 or array.dtype.kind != "U":
            raise ModelCorruptError(f"{where}: {name} must be a 1-D unicode array, got {array.dtype} {array.shape}")
    for name, ids in (("user_factors", model.user_ids), ("item_factors", model.item_ids)):
        array = getattr(model, name)
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != len(ids):
            raise ModelCorruptError(
                f"{where}: {name} must be float32 shaped ({len(ids)}, k), got {array.dtype} {array.shape}"
            )
    if model.user_factors.shape[1] != model.item_factors.shape[1]:
        raise ModelCorruptError(f"{where}: user and item factors have different widths")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a manifest")
