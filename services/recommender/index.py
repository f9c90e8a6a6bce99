"""Inner-product retrieval with FAISS.

``auto`` picks by catalogue size: an exact flat index up to ``exact_max`` items, the two-part IVF
below above that, or HNSW on request. On a GPU node (the runtime's device setting) the FAISS
parts are copied to the GPU.

Matrix-factorisation item vectors have very unequal norms (popular items are long, the long tail
is near zero), which defeats plain IVF on inner products. The ``ivf`` kind therefore splits the
catalogue by norm:

- the head -- the ``head_fraction`` longest vectors (at least ``head_min``) -- is searched
  exactly (one matrix-vector product);
- the tail is an IVF over the MIPS-to-L2 transform of its vectors (Bachrach et al., 2014: one more
  coordinate sqrt(M^2 - |x|^2), so L2 order equals inner-product order), with M the tail's own
  largest norm;
- the tail is skipped when it cannot matter: when the head's k-th score already reaches
  |q| * M, no tail item can enter the top-k (Cauchy-Schwarz), so that answer is exact.

``nprobe`` is tuned when the index is built: the smallest number of the tail's cells whose
results match exact search over the tail at ``target_recall`` (recall@k) on sample queries.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.runtime.device import Device

log = logging.getLogger("cbec.recommender.index")
PROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass
class IndexInfo:
    kind: str
    n: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    head: int = 0
    tail_max_norm: float = 0.0
    hnsw_m: int = 0
    ef_search: int = 0
    tuned_recall: float = 1.0
    tail_searched_share: float = 0.0


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (scores, ids), best first."""
    scores = np.atleast_2d(np.asarray(queries, dtype=np.float32)) @ np.asarray(vectors, dtype=np.float32).T
    return _top(scores, np.arange(scores.shape[1]), k)


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of ``scores`` (ids taken from ``ids``, same shape or one row to broadcast)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    part = np.take_along_axis(part, order, axis=1)
    ids = np.broadcast_to(ids, scores.shape) if ids.ndim == 1 else ids
    return np.take_along_axis(scores, part, axis=1), np.take_along_axis(ids, part, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size if truth.size else 1.0


def _augment(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    extra = np.sqrt(np.maximum(max_norm**2 - np.einsum("ij,ij->i", vectors, vectors), 0.0))
    return np.ascontiguousarray(np.hstack([vectors, extra[:, None]]), dtype=np.float32)


class VectorIndex:
    def __init__(
        self,
        info: IndexInfo,
        faiss_index: object | None,
        head_vectors: np.ndarray | None = None,
        head_ids: np.ndarray | None = None,
        tail_ids: np.ndarray | None = None,
        device: Device | None = None,
    ) -> None:
        self.info = info
        self._cpu_index = faiss_index
        self.index = faiss_index
        self.head_vectors = head_vectors
        self.head_ids = head_ids
        self.tail_ids = tail_ids
        self.device = device or Device("cpu")
        if faiss_index is not None and self.device.faiss_gpu is not None:
            self.index = self._to_gpu(faiss_index, self.device.faiss_gpu)
        self._set_params()

    # --- building ---
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        kind: str = "auto",
        exact_max: int = 50_000,
        nlist: int = 0,
        head_fraction: float = 0.005,
        head_min: int = 4096,
        hnsw_m: int = 32,
        target_recall: float = 0.95,
        tune_queries: np.ndarray | None = None,
        k: int = 10,
        seed: int = 0,
        device: Device | None = None,
    ) -> VectorIndex:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        if kind == "auto":
            kind = "flat" if n <= exact_max else "ivf"
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
            index.add(vectors)
            return cls(IndexInfo("flat", n, d), index, device=device)
        rng = np.random.default_rng(seed)
        if tune_queries is None or len(tune_queries) == 0:
            tune_queries = vectors[rng.choice(n, size=min(n, 500), replace=False)]
        tune_queries = np.ascontiguousarray(tune_queries, dtype=np.float32)
        _, truth = exact_top_k(vectors, tune_queries, k)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.add(vectors)
            built = cls(IndexInfo("hnsw", n, d, hnsw_m=hnsw_m), index, device=device)
            built._tune(tune_queries, truth, k, [16, 32, 64, 128, 256, 512], "ef_search", target_recall)
            return built
        if kind != "ivf":
            raise ValueError(f"unknown index kind {kind!r} (auto, flat, ivf, hnsw)")
        norms = np.linalg.norm(vectors, axis=1)
        order = np.argsort(-norms, kind="stable")
        head = min(n, max(head_min, int(head_fraction * n)))
        head_ids, tail_ids = np.sort(order[:head]), np.sort(order[head:])
        info = IndexInfo("ivf", n, d, head=head)
        tail_index = None
        if len(tail_ids):
            tail = vectors[tail_ids]
            m = len(tail_ids)
            info.tail_max_norm = float(norms[tail_ids].max()) or 1e-12
            info.nlist = nlist or max(16, min(m // 39, 2 ** round(math.log2(4 * math.sqrt(m)))))
            augmented = _augment(tail, info.tail_max_norm)
            tail_index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d + 1), d + 1, info.nlist, faiss.METRIC_L2)
            tail_index.cp.seed = seed
            tail_index.cp.niter = 12
            tail_index.train(augmented[rng.choice(m, size=min(m, 40 * info.nlist), replace=False)])
            tail_index.add(augmented)
        built = cls(
            info, tail_index, vectors[head_ids], head_ids.astype(np.int64), tail_ids.astype(np.int64), device
        )
        if tail_index is not None:
            built._tune_tail(vectors[tail_ids], tune_queries, k, target_recall)
        _, found = built.search(tune_queries, k)
        info.tuned_recall = round(recall_at_k(found, truth), 4)
        info.tail_searched_share = round(float(built._tail_needed(tune_queries, k).mean()), 4)
        log.info("built ivf index: %s", info)
        return built

    def _tune_tail(self, tail: np.ndarray, queries: np.ndarray, k: int, target: float) -> None:
        """nprobe for the tail on its own (however rarely the head leaves it to be searched)."""
        _, truth = exact_top_k(tail, queries, k)
        augmented = np.ascontiguousarray(np.hstack([queries, np.zeros((len(queries), 1), np.float32)]))
        for value in [p for p in PROBES if p <= self.info.nlist]:
            self.info.nprobe = value
            self._set_params()
            _, local = self.index.search(augmented, k)  # type: ignore[union-attr]
            if recall_at_k(local, truth) >= target:
                break

    def _tune(
        self, queries: np.ndarray, truth: np.ndarray, k: int, grid: list[int], field: str, target: float
    ) -> None:
        """The cheapest setting in ``grid`` reaching the target recall (else the last one)."""
        recall = 0.0
        for value in grid:
            setattr(self.info, field, value)
            self._set_params()
            _, found = self.search(queries, k)
            recall = recall_at_k(found, truth)
            self.info.tuned_recall = round(recall, 4)
            if recall >= target:
                break
        if self.info.kind == "ivf":
            self.info.tail_searched_share = round(self._tail_needed(queries, k).mean(), 4)
        log.info(
            "tuned %s index: %s=%d recall@%d=%.3f",
            self.info.kind,
            field,
            getattr(self.info, field),
            k,
            recall,
        )

    # --- searching ---
    def _set_params(self) -> None:
        import faiss

        if self.index is None:
            return
        if self.info.kind == "ivf" and self.info.nprobe:
            try:
                faiss.extract_index_ivf(self.index).nprobe = self.info.nprobe
            except RuntimeError:  # GPU IVF
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.info.nprobe)
        elif self.info.kind == "hnsw" and self.info.ef_search:
            self.index.hnsw.efSearch = self.info.ef_search  # type: ignore[attr-defined]

    def _head(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.head_vectors is not None and self.head_ids is not None
        return _top(queries @ self.head_vectors.T, self.head_ids, k)

    def _tail_needed(self, queries: np.ndarray, k: int) -> np.ndarray:
        scores, _ = self._head(queries, k)
        if self.tail_ids is None or not len(self.tail_ids):
            return np.zeros(len(queries), dtype=bool)
        if scores.shape[1] < k:
            return np.ones(len(queries), dtype=bool)
        bound = np.linalg.norm(queries, axis=1) * self.info.tail_max_norm
        return scores[:, -1] < bound

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores, ids), best first; ids are -1 past the end."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, self.info.n))
        if self.info.kind != "ivf":
            return self.index.search(queries, k)  # type: ignore[union-attr]
        scores, ids = self._head(queries, k)
        if self.index is None:
            return scores, ids
        bound = np.linalg.norm(queries, axis=1) * self.info.tail_max_norm
        need = np.flatnonzero((scores.shape[1] < k) | (scores[:, -1] < bound))
        if len(need) == 0:
            return scores, ids
        q = queries[need]
        augmented = np.ascontiguousarray(np.hstack([q, np.zeros((len(q), 1), np.float32)]))
        dist, local = self.index.search(augmented, k)  # type: ignore[attr-defined]
        # |q - x'|^2 = |q|^2 + M^2 - 2 q.x  ->  q.x
        tail_scores = (np.einsum("ij,ij->i", q, q)[:, None] + self.info.tail_max_norm**2 - dist) / 2
        assert self.tail_ids is not None
        tail_ids = np.where(local >= 0, self.tail_ids[np.maximum(local, 0)], -1)
        tail_scores = np.where(local >= 0, tail_scores, -np.inf).astype(np.float32)
        merged_scores = np.concatenate([scores[need], tail_scores], axis=1)
        merged_ids = np.concatenate([ids[need], tail_ids], axis=1)
        top_scores, top_ids = _top(merged_scores, merged_ids, k)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_scores[:, : scores.shape[1]], out_ids[:, : ids.shape[1]] = scores, ids
        out_scores[need], out_ids[need] = top_scores, top_ids
        return out_scores, out_ids

    @staticmethod
    def _to_gpu(index: object, gpu: int) -> object:
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            log.warning("GPU requested but this faiss build has no GPU support; index stays on the CPU")
            return index
        if isinstance(index, faiss.IndexHNSW):
            return index  # faiss has no GPU HNSW
        VectorIndex._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(VectorIndex._gpu_resources, gpu, index)

    # --- persistence ---
    def save(self, path: Path) -> None:
        import faiss

        path.mkdir(parents=True, exist_ok=True)
        if self._cpu_index is not None:
            faiss.write_index(self._cpu_index, str(path / "index.faiss"))
        for name in ("head_vectors", "head_ids", "tail_ids"):
            value = getattr(self, name)
            if value is not None:
                np.save(path / f"{name}.npy", value, allow_pickle=False)
        (path / "index.json").write_text(json.dumps(asdict(self.info), indent=2))

    @classmethod
    def load(cls, path: Path, device: Device | None = None) -> VectorIndex:
        import faiss

        raw = json.loads((path / "index.json").read_text())
        info = IndexInfo(**{k: v for k, v in raw.items() if k in IndexInfo.__dataclass_fields__})
        index = faiss.read_index(str(path / "index.faiss")) if (path / "index.faiss").exists() else None
        arrays = {
            name: np.load(path / f"{name}.npy", allow_pickle=False)
            if (path / f"{name}.npy").exists()
            else None
            for name in ("head_vectors", "head_ids", "tail_ids")
        }
        held = (index.ntotal if index is not None else 0) + (
            len(arrays["head_ids"]) if arrays["head_ids"] is not None else 0
        )
        if held != info.n:
            raise ValueError(f"index at {path} holds {held} vectors, expected {info.n}")
        return cls(info, index, device=device, **arrays)
