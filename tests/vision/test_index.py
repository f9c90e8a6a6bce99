"""The FAISS index: exact and IVF search, filters, removal, checksummed snapshots, GPU selection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from services.runtime.device import Device
from services.vision.index import (
    IndexDeviceError,
    SnapshotError,
    VectorIndex,
    index_type_for,
    load_snapshot,
    nlist_for,
    remove_snapshots,
    save_snapshot,
    select_index_gpu,
)


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, dim: int = 16, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_type_policy() -> None:
    assert index_type_for(10, 100) == "Flat"
    assert index_type_for(100, 100) == "Flat"
    assert index_type_for(1_000_000, 100) == "IVF1024,Flat"
    assert nlist_for(10_000) == 128
    assert nlist_for(1) == 16


def test_flat_search_is_exact_with_ids_filters_and_removal() -> None:
    x = unit(200)
    ids = np.arange(1000, 1200)
    index = VectorIndex.build(ids, x, 16)
    scores, found = index.search(x[:5], 3)
    assert list(found[:, 0]) == list(ids[:5])
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    allowed = np.array([1100, 1101, 1102])
    _, found = index.search(x[:1], 3, allowed)
    assert set(found[0]) == set(allowed.tolist())
    assert index.remove([1000, 1001, 99999]) == 2
    assert index.ntotal == 198
    _, found = index.search(x[:1], 1)
    assert found[0, 0] != 1000
    assert sorted(index.ids().tolist()) == list(range(1002, 1200))
    _, none = index.search(x[:1], 5, np.array([], dtype=np.int64))
    assert (none == -1).all()


def test_empty_index_searches_to_nothing() -> None:
    index = VectorIndex.build([], np.zeros((0, 16), np.float32), 16)
    scores, found = index.search(unit(2), 5)
    assert (found == -1).all() and np.isneginf(scores).all()
    index.add([7], unit(1))
    _, found = index.search(unit(1), 5)
    assert found[0, 0] == 7


def test_ivf_recall_against_exact_and_removal() -> None:
    x = clustered(6000)
    ids = np.arange(6000) * 3
    exact = VectorIndex.build(ids, x, 16)
    ivf = VectorIndex.build(ids, x, 16, "IVF64,Flat", nprobe=16)
    q = clustered(100, seed=9)
    _, truth = exact.search(q, 10)
    _, approx = ivf.search(q, 10)
    recall = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(approx, truth, strict=True)])
    assert recall >= 0.9
    assert sorted(ivf.ids().tolist()) == sorted(ids.tolist())
    assert ivf.remove(ids[:10]) == 10
    assert ivf.ntotal == 5990
    _, found = ivf.search(x[:1], 5)
    assert ids[0] not in found[0]
    # A narrow filter still finds its members (every list is scanned).
    allowed = ids[[100, 2000, 4000]]
    _, found = ivf.search(x[100:101], 3, allowed)
    assert set(found[0]) == set(allowed.tolist())


def test_snapshot_round_trip_and_version_guard(tmp_path: Path) -> None:
    x = unit(50)
    index = VectorIndex.build(np.arange(50), x, 16)
    meta = save_snapshot(tmp_path, "v1", index, seq=42)
    loaded, loaded_meta = load_snapshot(tmp_path, "v1", 16)
    assert loaded_meta == meta
    assert loaded.ntotal == 50 and loaded_meta.seq == 42
    assert np.array_equal(loaded.search(x[:3], 1)[1], index.search(x[:3], 1)[1])
    with pytest.raises(SnapshotError, match="no index snapshot"):
        load_snapshot(tmp_path, "v2", 16)
    with pytest.raises(SnapshotError, match="dimension"):
        load_snapshot(tmp_path, "v1", 32)
    # Metadata that claims another model version is refused, never used.
    meta_path = tmp_path / "index-v1.json"
    raw = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**raw, "model_version": "v0"}))
    with pytest.raises(SnapshotError, match="built by model v0"):
        load_snapshot(tmp_path, "v1", 16)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage-meta", "empty"])
def test_corrupt_snapshots_are_detected_before_faiss_reads_them(tmp_path: Path, damage: str) -> None:
    index = VectorIndex.build(np.arange(100), unit(100), 16)
    save_snapshot(tmp_path, "v1", index, seq=1)
    data_path, meta_path = tmp_path / "index-v1.faiss", tmp_path / "index-v1.json"
    payload = bytearray(data_path.read_bytes())
    if damage == "flip":
        payload[len(payload) // 2] ^= 0xFF
        data_path.write_bytes(bytes(payload))
    elif damage == "truncate":
        data_path.write_bytes(bytes(payload[:100]))
    elif damage == "garbage-meta":
        meta_path.write_text("{not json")
    else:
        data_path.write_bytes(b"")
    with pytest.raises(SnapshotError):
        load_snapshot(tmp_path, "v1", 16)


def test_remove_snapshots_keeps_live_versions(tmp_path: Path) -> None:
    index = VectorIndex.build(np.arange(3), unit(3), 16)
    for version in ("a", "b", "c"):
        save_snapshot(tmp_path, version, index, 0)
    remove_snapshots(tmp_path, {"b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index-b.faiss", "index-b.json"]


class FakeGpuFaiss:
    """The real faiss module plus the GPU entry points of a faiss-gpu build, recording their use. The
    'GPU replica' is a CPU clone, so searches stay real."""

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus
        self.copies: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(faiss, name)

    def get_num_gpus(self) -> int:
        return self.gpus

    class StandardGpuResources:
        pass

    def index_cpu_to_gpu(self, resources: Any, device: int, index: Any) -> Any:
        self.copies.append(device)
        return faiss.clone_index(index)


def test_gpu_selection_follows_the_runtime_device() -> None:
    gpu_faiss = FakeGpuFaiss(gpus=2)
    assert select_index_gpu(Device("cpu"), True, False, gpu_faiss) is None
    assert select_index_gpu(Device("cuda", 1), True, True, gpu_faiss) == 1
    assert select_index_gpu(Device("cuda", 0), False, True, gpu_faiss) is None  # index GPU switched off
    with pytest.raises(IndexDeviceError, match="GPU 3"):
        select_index_gpu(Device("cuda", 3), True, False, gpu_faiss)


def test_gpu_node_with_cpu_only_faiss(caplog: pytest.LogCaptureFixture) -> None:
    assert select_index_gpu(Device("cuda", 0), True, explicit=False, module=faiss) is None
    assert "no GPU support" in caplog.text
    with pytest.raises(IndexDeviceError, match="faiss-gpu"):
        select_index_gpu(Device("cuda", 0), True, explicit=True, module=faiss)


def test_gpu_replica_serves_unfiltered_searches_and_is_refreshed_after_changes() -> None:
    fake = FakeGpuFaiss(gpus=1)
    x = unit(100)
    index = VectorIndex.build(np.arange(100), x, 16, gpu=0, module=fake)
    assert index.on_gpu
    assert index.search(x[:2], 1)[1][:, 0].tolist() == [0, 1]
    assert fake.copies == [0]
    index.search(x[:2], 1)
    assert fake.copies == [0]  # unchanged index: the replica is reused
    index.add([500], unit(1, seed=5))
    index.remove([0])
    _, found = index.search(unit(1, seed=5), 1)
    assert found[0, 0] == 500 and fake.copies == [0, 0]
    _, found = index.search(x[:1], 2, np.array([3, 4]))  # filtered: CPU index with a selector
    assert set(found[0]) == {3, 4} and fake.copies == [0, 0]
