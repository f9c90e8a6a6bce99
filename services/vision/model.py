"""The embedding model of one version: the frozen backbone plus, when fine-tuned, a projection head.

A version folder holds ``model.json`` (what the model is: backbone, input size, head shape,
near-duplicate threshold, checksum of the head weights) and, for fine-tuned versions, ``head.pt``.
Embeddings are L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import features

MODEL_FILE = "model.json"
HEAD_FILE = "head.pt"
DUPLICATES_FILE = "duplicates.npz"


class DuplicateProjector:
    """Backbone features -> a short instance descriptor for near-duplicate detection (PCA, whitened,
    unit length). The retrieval embedding cannot serve: metric learning on product classes makes
    distinct products of a class nearly identical, while a re-upload of the same picture must be told
    apart from a similar product."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, scale: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.components = np.asarray(components, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)
        if self.components.shape != (len(self.scale), len(self.mean)):
            raise ValueError(f"projection of shape {self.components.shape} does not fit its mean and scale")
        # Applied with torch, in the thread pool the CNN already uses: a numpy (OpenBLAS) product here
        # wakes a second set of BLAS threads that fight torch's for the same cores.
        self._mean = torch.from_numpy(self.mean)
        self._projection = torch.from_numpy(np.ascontiguousarray(self.components.T / self.scale))

    @property
    def dim(self) -> int:
        return len(self.scale)

    @classmethod
    def fit(cls, feats: np.ndarray, dim: int = 128) -> DuplicateProjector:
        x = np.asarray(feats, dtype=np.float64)
        mean = x.mean(axis=0)
        _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
        dim = min(dim, len(singular))
        scale = np.maximum(singular[:dim], 1e-6 * singular[0])
        return cls(mean, vt[:dim], scale)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
            return F.normalize((x - self._mean) @ self._projection, dim=1).numpy()

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, mean=self.mean, components=self.components, scale=self.scale)

    @classmethod
    def load(cls, path: Path) -> DuplicateProjector:
        with np.load(path, allow_pickle=False) as raw:
            return cls(raw["mean"], raw["components"], raw["scale"])


class ProjectionHead(torch.nn.Module):
    """Backbone features -> a small embedding trained for retrieval (metric learning)."""

    def __init__(self, in_dim: int = features.FEATURE_DIM, hidden: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim
        self.net = torch.nn.Sequential(
            torch.nn.Dropout(0.2),
            torch.nn.Linear(in_dim, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


@dataclass
class ModelSpec:
    kind: Literal["pretrained", "finetuned"]
    image_size: int
    dim: int
    near_duplicate_threshold: float
    backbone: str = features.BACKBONE
    head: dict[str, int] = field(default_factory=dict)
    head_sha256: str = ""
    duplicates_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> ModelSpec:
        raw: dict[str, Any] = json.loads((folder / MODEL_FILE).read_text())
        spec = cls(
            kind=raw["kind"],
            image_size=int(raw["image_size"]),
            dim=int(raw["dim"]),
            near_duplicate_threshold=float(raw["near_duplicate_threshold"]),
            backbone=str(raw.get("backbone", features.BACKBONE)),
            head={str(k): int(v) for k, v in raw.get("head", {}).items()},
            head_sha256=str(raw.get("head_sha256", "")),
            duplicates_sha256=str(raw.get("duplicates_sha256", "")),
        )
        if spec.kind not in ("pretrained", "finetuned"):
            raise ValueError(f"unknown model kind {spec.kind!r}")
        if spec.backbone != features.BACKBONE:
            raise ValueError(f"backbone {spec.backbone!r} is not {features.BACKBONE!r}")
        if not 16 <= spec.image_size <= 1024:
            raise ValueError(f"image_size {spec.image_size} out of range")
        return spec


class Embedder:
    """Pixels -> L2-normalised embeddings for one model version; thread-safe for inference."""

    def __init__(
        self,
        spec: ModelSpec,
        head: ProjectionHead | None,
        duplicates: DuplicateProjector,
        version: str = "",
        device: str = "cpu",
        backbone: features.Backbone | None = None,
    ) -> None:
        if (head is None) != (spec.kind == "pretrained"):
            raise ValueError("a fine-tuned model needs a head and a pretrained one has none")
        if duplicates.mean.shape != (features.FEATURE_DIM,):
            raise ValueError("the duplicate projector does not fit the backbone features")
        self.spec = spec
        self.version = version
        self.device = device
        self.duplicates = duplicates
        self.backbone = backbone or features.shared_backbone(device)
        self.head = head.to(device).eval() if head is not None else None

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def dim(self) -> int:
        return self.spec.dim

    def embed_features(self, feats: np.ndarray) -> np.ndarray:
        """Backbone features (N, 1280) -> embeddings (N, dim) float32, unit length."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).to(self.device)
            out = self.head(x) if self.head is not None else F.normalize(x, dim=1)
            return out.float().cpu().numpy()

    def backbone_features(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"pixels of shape {pixels.shape} do not fit input size {self.image_size}")
        return features.compute(self.backbone, pixels, self.device)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, dim) float32, unit length."""
        return self.embed_features(self.backbone_features(pixels))

    def embed_with_duplicates(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Retrieval embeddings and near-duplicate descriptors from one CNN pass."""
        feats = self.backbone_features(pixels)
        return self.embed_features(feats), self.duplicates(feats)


def pretrained_spec(image_size: int, near_duplicate_threshold: float) -> ModelSpec:
    return ModelSpec("pretrained", image_size, features.FEATURE_DIM, near_duplicate_threshold)


def save(folder: Path, spec: ModelSpec, head: ProjectionHead | None, duplicates: DuplicateProjector) -> None:
    """Write the model files of a version (into the model store's temporary version folder)."""
    duplicates.save(folder / DUPLICATES_FILE)
    spec.duplicates_sha256 = hashlib.sha256((folder / DUPLICATES_FILE).read_bytes()).hexdigest()
    if head is not None:
        torch.save(head.state_dict(), folder / HEAD_FILE)
        spec.head = {"in_dim": head.in_dim, "hidden": head.hidden, "out_dim": head.out_dim}
        spec.head_sha256 = hashlib.sha256((folder / HEAD_FILE).read_bytes()).hexdigest()
    (folder / MODEL_FILE).write_text(spec.to_json())


def load(folder: Path, version: str = "", device: str = "cpu") -> Embedder:
    """Load a version folder; raises on a missing, corrupt or inconsistent file."""
    spec = ModelSpec.read(folder)
    head = None
    if spec.kind == "finetuned":
        blob = (folder / HEAD_FILE).read_bytes()
        if hashlib.sha256(blob).hexdigest() != spec.head_sha256:
            raise ValueError(f"{HEAD_FILE} does not match its checksum in {MODEL_FILE}")
        head = ProjectionHead(**spec.head)
        head.load_state_dict(torch.load(folder / HEAD_FILE, map_location="cpu", weights_only=True))
        if head.out_dim != spec.dim:
            raise ValueError(f"head output {head.out_dim} is not the declared dimension {spec.dim}")
    blob = (folder / DUPLICATES_FILE).read_bytes()
    if hashlib.sha256(blob).hexdigest() != spec.duplicates_sha256:
        raise ValueError(f"{DUPLICATES_FILE} does not match its checksum in {MODEL_FILE}")
    return Embedder(spec, head, DuplicateProjector.load(folder / DUPLICATES_FILE), version, device)
