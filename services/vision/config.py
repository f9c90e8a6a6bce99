"""Vision service settings: the runtime's ``CBEC_*`` settings plus ``CBEC_VISION_*`` ones."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from services.runtime.config import RuntimeSettings


class VisionSettings(RuntimeSettings):
    service: str = "vision"
    # A CNN batch costs far more than waiting a few ms for one to fill.
    batch_max_delay_ms: float = Field(4.0, ge=0, le=10_000)
    batch_max_size: int = Field(32, ge=1, le=4096)

    vision_index_dir: Path = Field(
        Path("var/vision"),
        description="Catalogue (SQLite: products, their images, embeddings per model version) and "
        "FAISS index snapshots.",
    )
    vision_data_dir: Path = Field(
        Path("data/vision"),
        description="Fashion-MNIST copy (when not installed system-wide) and the backbone feature cache.",
    )
    vision_max_image_bytes: int = Field(
        6 * 1024 * 1024, ge=64, le=512 * 1024 * 1024, description="Larger uploads: RESOURCE_EXHAUSTED."
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
