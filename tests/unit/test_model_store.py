"""The model store: atomic publish, CURRENT, retention, checksums."""

import json
import os

import numpy as np
import pytest

from batch.model_store import ModelCorruptError, ModelStore, ModelStoreError


def publish(store: ModelStore, n_users=3, n_items=4, k=2, **kwargs) -> str:
    rng = np.random.default_rng(len(store.versions()))
    return store.publish(
        np.array([f"u{i}" for i in range(n_users)]),
        np.array([f"t{i}" for i in range(n_items)]),
        rng.random((n_users, k), dtype=np.float32),
        rng.random((n_items, k), dtype=np.float32),
        **kwargs,
    )


def test_publish_and_load_round_trip(tmp_path):
    store = ModelStore(tmp_path)
    version = publish(store, manifest={"parameters": {"factors": 2}, "metrics": {"p": 0.5}})
    assert (tmp_path / "models" / "CURRENT").read_text().strip() == version
    model = store.load()
    assert model.version == version
    assert model.user_ids.tolist() == ["u0", "u1", "u2"]
    assert isinstance(model.user_factors, np.memmap) and not model.user_factors.flags.writeable
    assert model.item_index["t3"] == 3
    manifest = json.loads((tmp_path / "models" / version / "manifest.json").read_text())
    assert manifest["parameters"] == {"factors": 2} and manifest["rows"] == {"users": 3, "items": 4}
    assert set(manifest["files"]) == {"user_ids.npy", "item_ids.npy", "user_factors.npy", "item_factors.npy"}
    assert all(len(meta["sha256"]) == 64 for meta in manifest["files"].values())


def test_extra_artifacts_are_checksummed(tmp_path):
    store = ModelStore(tmp_path)

    def extra(directory):
        np.save(directory / "forest_nodes.npy", np.arange(5))
        return {"index": {"trees": 1}}

    version = publish(store, extra=extra)
    manifest = store.verify(version)
    assert "forest_nodes.npy" in manifest["files"] and manifest["index"] == {"trees": 1}


def test_damaged_file_is_refused(tmp_path):
    store = ModelStore(tmp_path)
    version = publish(store)
    path = tmp_path / "models" / version / "item_factors.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelCorruptError, match="sha256"):
        store.load()
    os.remove(path)
    with pytest.raises(ModelCorruptError, match="missing"):
        store.load()


def test_retention_keeps_current_and_newest(tmp_path):
    store = ModelStore(tmp_path, keep=2)
    first = publish(store)
    publish(store)
    third = publish(store)
    assert store.versions()[-1] == third and len(store.versions()) == 2 and first not in store.versions()
    store.set_current(store.versions()[0])
    pinned = store.current_version()
    publish(store, make_current=False)
    assert pinned in store.versions()


def test_empty_store_and_bad_pointer(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelStoreError, match="no model published"):
        store.load()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "CURRENT").write_text("../../etc\n")
    with pytest.raises(ModelStoreError, match="not a model version"):
        store.load()


def test_failed_publish_leaves_the_live_model(tmp_path):
    store = ModelStore(tmp_path)
    live = publish(store)

    def explode(directory):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish(store, extra=explode)
    assert store.current_version() == live and store.versions() == [live]
    assert not list((tmp_path / "models").glob(".tmp-*"))


def test_misaligned_arrays_are_rejected(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelCorruptError, match="user_factors"):
        store.publish(np.array(["a", "b"]), np.array(["x"]), np.ones((3, 2), np.float32), np.ones((1, 2), np.float32))
