"""FAISS vector index over catalogue row ids: exact for small catalogues, IVF for large ones, a GPU
replica on a GPU node, and checksummed snapshots on disk that record the model version that built them.

The CPU index is the master (additions and removals go there); on a GPU node a replica is copied to
the GPU after changes and serves unfiltered searches. Filtered searches (category, market) use the
CPU index with an id selector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import faiss
import numpy as np

from services.runtime.device import Device

log = logging.getLogger("cbec.vision.index")
SNAPSHOT_FORMAT = 1


class IndexDeviceError(RuntimeError):
    pass


class SnapshotError(RuntimeError):
    """A snapshot that cannot be used (missing, another model version, corrupt): rebuild instead."""


def faiss_has_gpu(module: ModuleType | Any = faiss) -> bool:
    return hasattr(module, "StandardGpuResources") and int(getattr(module, "get_num_gpus", lambda: 0)()) > 0


def select_index_gpu(
    device: Device, want_gpu: bool, explicit: bool, module: ModuleType | Any = faiss
) -> int | None:
    """GPU id for the index replica, or None for CPU only.

    The runtime's Device decides whether this node has a GPU (``Device.faiss_gpu``). A GPU node whose
    faiss build has no GPU support (faiss-cpu installed) keeps the index on the CPU with a warning,
    unless a GPU was asked for explicitly (``CBEC_DEVICE=cuda``): then start-up fails, because a GPU
    node quietly searching on the CPU is an outage that looks healthy.
    """
    gpu = device.faiss_gpu
    if gpu is None or not want_gpu:
        return None
    if not faiss_has_gpu(module):
        message = f"device {device} selected but this faiss build has no GPU support (install faiss-gpu)"
        if explicit:
            raise IndexDeviceError(message)
        log.warning("%s: the index stays on the CPU", message)
        return None
    count = int(module.get_num_gpus())
    if gpu >= count:
        raise IndexDeviceError(f"faiss sees {count} GPU(s); cannot use GPU {gpu}")
    return gpu


def nlist_for(n: int) -> int:
    """IVF lists: about sqrt(n), a power of two, at least 16 (1M vectors: 1024 lists; with nprobe 64
    a query scans ~6% of the vectors; training and adding stay cheap on a few CPU cores)."""
    return max(16, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))


def index_type_for(n: int, exact_max: int) -> str:
    return "Flat" if n <= exact_max else f"IVF{nlist_for(n)},Flat"


def _as_ids(ids: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _as_vectors(vectors: Any, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"vectors of shape {x.shape} do not have dimension {dim}")
    return x


class VectorIndex:
    """Inner-product search over unit vectors keyed by int64 ids."""

    def __init__(
        self,
        cpu_index: Any,
        index_type: str,
        dim: int,
        nprobe: int = 64,
        gpu: int | None = None,
        module: ModuleType | Any = faiss,
    ) -> None:
        self.cpu = cpu_index
        self.index_type = index_type
        self.dim = dim
        self.nprobe = nprobe
        self.gpu = gpu
        self._faiss = module
        self._gpu_index: Any = None
        self._gpu_resources: Any = None
        self._gpu_stale = True
        self.built_time = time.time()

    @property
    def is_ivf(self) -> bool:
        return self.index_type.startswith("IVF")

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None

    @classmethod
    def build(
        cls,
        ids: Any,
        vectors: Any,
        dim: int,
        index_type: str = "Flat",
        nprobe: int = 64,
        gpu: int | None = None,
        seed: int = 0,
        module: ModuleType | Any = faiss,
    ) -> VectorIndex:
        ids = _as_ids(ids)
        x = _as_vectors(vectors, dim) if len(ids) else np.zeros((0, dim), dtype=np.float32)
        if index_type == "Flat":
            cpu = module.IndexIDMap2(module.IndexFlatIP(dim))
        elif index_type.startswith("IVF") and index_type.endswith(",Flat"):
            nlist = int(index_type[3:].split(",")[0])
            if len(x) < nlist:
                raise ValueError(f"IVF{nlist} needs at least {nlist} vectors to train, got {len(x)}")
            quantizer = module.IndexFlatIP(dim)
            cpu = module.IndexIVFFlat(quantizer, dim, nlist, module.METRIC_INNER_PRODUCT)
            cpu.own_fields = True
            quantizer.this.disown()
            rng = np.random.default_rng(seed)
            sample = x if len(x) <= 40 * nlist else x[rng.choice(len(x), 40 * nlist, replace=False)]
            cpu.train(sample)
        else:
            raise ValueError(f"unsupported index type {index_type!r}")
        index = cls(cpu, index_type, dim, nprobe, gpu, module)
        if len(ids):
            index.cpu.add_with_ids(x, ids)
        return index

    def add(self, ids: Any, vectors: Any) -> None:
        ids = _as_ids(ids)
        if len(ids):
            self.cpu.add_with_ids(_as_vectors(vectors, self.dim), ids)
            self._gpu_stale = True

    def remove(self, ids: Any) -> int:
        ids = _as_ids(ids)
        if not len(ids):
            return 0
        removed = int(self.cpu.remove_ids(self._faiss.IDSelectorBatch(ids)))
        self._gpu_stale = True
        return removed

    def ids(self) -> np.ndarray:
        """Every id in the index (for the consistency check against the catalogue)."""
        if not self.is_ivf:
            return self._faiss.vector_to_array(self.cpu.id_map).astype(np.int64)
        invlists = self.cpu.invlists
        parts = []
        for list_no in range(self.cpu.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                parts.append(self._faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(list_no, ptr)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def _replica(self) -> Any:
        """The GPU copy of the index, refreshed after changes (None on CPU-only nodes)."""
        if self.gpu is None:
            return None
        if self._gpu_stale or self._gpu_index is None:
            if self._gpu_resources is None:
                self._gpu_resources = self._faiss.StandardGpuResources()
            self._gpu_index = self._faiss.index_cpu_to_gpu(self._gpu_resources, self.gpu, self.cpu)
            if self.is_ivf:
                self._gpu_index.nprobe = min(self.nprobe, 2048)  # GPU IVF caps nprobe
            self._gpu_stale = False
        return self._gpu_index

    def search(
        self, queries: Any, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best per query; ids -1 pad missing results. ``allowed`` restricts
        results to those ids (filters)."""
        q = _as_vectors(queries, self.dim)
        k = max(1, min(k, max(1, self.ntotal)))
        if self.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if allowed is None:
            replica = self._replica()
            if replica is not None:
                return replica.search(q, k)
            if self.is_ivf:
                return self.cpu.search(q, k, params=self._faiss.SearchParametersIVF(nprobe=self.nprobe))
            return self.cpu.search(q, k)
        allowed = _as_ids(allowed)
        if not len(allowed):
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        selector = self._faiss.IDSelectorBatch(allowed)
        if self.is_ivf:
            # A narrow filter leaves few candidates in the probed lists: then scan every list.
            nprobe = self.cpu.nlist if len(allowed) < 0.05 * self.ntotal else self.nprobe
            params = self._faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        else:
            params = self._faiss.SearchParameters(sel=selector)
        return self.cpu.search(q, k, params=params)

    def memory_bytes(self) -> int:
        return len(self._faiss.serialize_index(self.cpu))


# --- snapshots ---
@dataclass(frozen=True)
class SnapshotMeta:
    model_version: str
    seq: int
    ntotal: int
    dim: int
    index_type: str
    sha256: str
    size: int
    built_time: float
    catalogue_id: str = ""
    token: str = ""  # the catalogue's token of change ``seq``
    format: int = SNAPSHOT_FORMAT


def _paths(folder: Path, version: str) -> tuple[Path, Path]:
    return folder / f"index-{version}.faiss", folder / f"index-{version}.json"


def _write_atomic(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_snapshot(
    folder: Path, version: str, index: VectorIndex, seq: int, catalogue_id: str = "", token: str = ""
) -> SnapshotMeta:
    """Write the index and its metadata (model version, change number, checksum), each atomically.
    The metadata goes last, so a crash in between leaves a snapshot whose checksum does not match."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = faiss.serialize_index(index.cpu).tobytes()
    meta = SnapshotMeta(
        model_version=version,
        seq=seq,
        ntotal=index.ntotal,
        dim=index.dim,
        index_type=index.index_type,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        built_time=index.built_time,
        catalogue_id=catalogue_id,
        token=token,
    )
    data_path, meta_path = _paths(folder, version)
    _write_atomic(data_path, payload)
    _write_atomic(meta_path, json.dumps(meta.__dict__, indent=2).encode())
    return meta


def load_snapshot(
    folder: Path, version: str, dim: int, nprobe: int = 64, gpu: int | None = None
) -> tuple[VectorIndex, SnapshotMeta]:
    """Load the snapshot built by ``version``; SnapshotError when it is absent, built by another model,
    or fails its checksum (the file is verified before FAISS parses a byte of it)."""
    data_path, meta_path = _paths(folder, version)
    if not meta_path.exists() or not data_path.exists():
        raise SnapshotError(f"no index snapshot for model version {version}")
    try:
        raw = json.loads(meta_path.read_text())
        meta = SnapshotMeta(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise SnapshotError(f"index metadata {meta_path} is corrupt: {exc}") from None
    if meta.format != SNAPSHOT_FORMAT:
        raise SnapshotError(f"index snapshot format {meta.format} is not {SNAPSHOT_FORMAT}")
    if meta.model_version != version:
        raise SnapshotError(f"index snapshot was built by model {meta.model_version}, not {version}")
    if meta.dim != dim:
        raise SnapshotError(f"index snapshot has dimension {meta.dim}, the model {dim}")
    payload = data_path.read_bytes()
    if len(payload) != meta.size or hashlib.sha256(payload).hexdigest() != meta.sha256:
        raise SnapshotError(f"index file {data_path} is corrupt (checksum mismatch)")
    try:
        cpu = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
    except RuntimeError as exc:
        raise SnapshotError(f"index file {data_path} is unreadable: {exc}") from None
    if cpu.d != dim or cpu.ntotal != meta.ntotal:
        raise SnapshotError(f"index file {data_path} holds {cpu.ntotal}x{cpu.d}, metadata says otherwise")
    index = VectorIndex(cpu, meta.index_type, dim, nprobe, gpu)
    index.built_time = meta.built_time
    return index, meta


def remove_snapshots(folder: Path, keep_versions: set[str]) -> None:
    """Delete snapshots of model versions that no longer exist."""
    for meta_path in folder.glob("index-*.json"):
        version = meta_path.stem[len("index-") :]
        if version not in keep_versions:
            for path in _paths(folder, version):
                path.unlink(missing_ok=True)
