"""Vision service settings: the runtime's ``CBEC_*`` settings plus ``CBEC_VISION_*`` ones."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from services.runtime.config import RuntimeSettings


class VisionSettings(RuntimeSettings):
    service: str = "vision"
    # A CNN batch costs far more than waiting a few ms for one to fill.
    batch_max_delay_ms: float = Field(4.0, ge=0, le=10_000)
    batch_max_size: int = Field(32, ge=1, le=4096)

    # The catalogue (products, images, embeddings per model version, change log) is the runtime's store
    # "vision": <CBEC_STATE_DIR>/vision.sqlite3 embedded, the vision_* tables of the shared PostgreSQL.
    vision_index_dir: Path | None = Field(
        None,
        description="Local cache of FAISS index snapshots (rebuilt from the catalogue when missing); "
        "empty = <CBEC_STATE_DIR>/vision. Must be writable and outside CBEC_MODELS_DIR.",
    )
    vision_sync_check_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="Safety re-check of the catalogue's change log; the change feed (NOTIFY) normally "
        "brings another replica's writes within milliseconds.",
    )
    vision_data_dir: Path = Field(
        Path("data/vision"),
        description="Fashion-MNIST copy (when not installed system-wide) and the backbone feature cache.",
    )
    vision_fashion_mnist_dir: Path | None = Field(
        None,
        description="A folder holding the Fashion-MNIST idx files, searched before the installed Debian "
        "package and the copy under vision_data_dir.",
    )
    vision_max_image_bytes: int = Field(
        6 * 1024 * 1024,
        ge=64,
        le=64 * 1024 * 1024,
        description="Larger uploads: INVALID_ARGUMENT naming the limit (the contract's is 64 MiB).",
    )
    vision_max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Width x height limit checked from the header before decoding (decompression bombs).",
    )
    vision_max_k: int = Field(1000, ge=1, le=100_000)
    vision_default_k: int = Field(10, ge=1, le=100_000)
    vision_exact_max: int = Field(
        200_000, ge=1, description="Catalogues up to this size use an exact (Flat) index, larger ones IVF."
    )
    vision_ivf_nprobe: int = Field(64, ge=1, le=65_536, description="IVF lists probed per query.")
    vision_index_gpu: bool = Field(
        True, description="Put the FAISS index on the GPU when CBEC_DEVICE selects one."
    )
    vision_snapshot_every: int = Field(
        1000, ge=1, description="Persist the index snapshot after this many catalogue changes."
    )
    vision_near_duplicate_threshold: float | None = Field(
        None, ge=-1, le=1, description="Overrides the model's calibrated near-duplicate threshold."
    )
    vision_decode_threads: int = Field(2, ge=1, le=64, description="Threads decoding and resizing uploads.")
    vision_torch_threads: int = Field(
        0, ge=0, le=256, description="torch intra-op threads; 0 = torch default."
    )
    vision_inference_streams: int = Field(
        1, ge=1, le=64, description="CNN batches computed at the same time (the batcher's concurrency)."
    )
    vision_index_concurrency: int = Field(
        32, ge=1, le=4096, description="Images of one IndexProducts stream embedded at the same time."
    )

    @model_validator(mode="after")
    def _k(self) -> VisionSettings:
        if self.vision_default_k > self.vision_max_k:
            raise ValueError("CBEC_VISION_DEFAULT_K must not exceed CBEC_VISION_MAX_K")
        return self

    @field_validator("vision_index_dir", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _index_dir(self) -> VisionSettings:
        if self.vision_index_dir is not None:
            self.vision_index_dir = self.vision_index_dir.expanduser().absolute()
            models = self.models_dir.expanduser().absolute()
            if self.vision_index_dir == models or models in self.vision_index_dir.parents:
                raise ValueError("CBEC_VISION_INDEX_DIR must not be inside CBEC_MODELS_DIR (read-only)")
        return self

    @property
    def index_cache_dir(self) -> Path:
        """Where FAISS index snapshots are cached (absolute, writable, never the models dir)."""
        return self.vision_index_dir or self.state_dir / "vision"
