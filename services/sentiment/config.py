"""Sentiment settings (environment ``CBEC_SENTIMENT_*``), on top of the runtime's shared settings.

Every field a service declares is read with its prefix (``services/runtime/registry.py``); these fields
are named ``sentiment_*`` already, which the prefix does not repeat (``sentiment_int8`` is
``CBEC_SENTIMENT_INT8``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.runtime.config import RuntimeSettings

from .encoder import DEFAULT_INT8


class SentimentSettings(RuntimeSettings):
    service: str = "sentiment"
    sentiment_db_path: Path | None = Field(
        None,
        description=(
            "A reviews.db written before the state layer (default <models dir>/sentiment-data/reviews.db "
            "when it exists): read once, read-only, into the review store at start if the store is empty. "
            "Reviews are stored in the runtime's state store (CBEC_STATE_DIR or the shared database)."
        ),
    )
    sentiment_cache_dir: Path | None = Field(
        None, description="Embedding cache folder; default <models dir>/.cache/sentiment."
    )
    sentiment_max_tokens: int = Field(
        512, ge=16, le=512, description="Token limit per text; longer texts are cut and flagged."
    )
    # Per-request limits are INVALID_ARGUMENT naming the field. The contract (sentiment.proto) caps a
    # text at 65,536 characters (256 KiB as utf8_bytes), a call at 256 texts or 1,000 reviews; these
    # settings may only be stricter.
    sentiment_max_text_bytes: int = Field(
        64 * 1024, ge=256, le=256 * 1024, description="Larger texts are refused, not cut."
    )
    sentiment_max_texts_per_call: int = Field(256, ge=1, le=256)
    sentiment_max_reviews_per_call: int = Field(1000, ge=1, le=1000)
    sentiment_alert_negative_share: float = Field(
        0.30, gt=0, lt=1, description="Alert when a window's negative share exceeds this."
    )
    sentiment_alert_negative_rise: float = Field(
        0.10, gt=0, lt=1, description="Alert when the negative share rises this much, significantly."
    )
    sentiment_significance: float = Field(0.05, gt=0, lt=1)
    sentiment_min_theme_count: int = Field(3, ge=1)
    sentiment_max_window_days: int = Field(3660, ge=1)
    sentiment_stream_window: int = Field(
        64, ge=1, le=4096, description="AnalyzeStream texts in flight before reading more."
    )
    sentiment_embed_threads: int = Field(0, ge=0, le=256, description="torch threads; 0 = torch's default.")
    sentiment_int8: bool = Field(
        DEFAULT_INT8,
        description="Run the encoder's linear layers as dynamic int8 (CPU only; ignored on GPU).",
    )

    @property
    def legacy_db_path(self) -> Path:
        """Where a pre-state-layer review file may be (never written: it may sit on the models mount)."""
        return self.sentiment_db_path or self.models_dir / "sentiment-data" / "reviews.db"

    @property
    def cache_dir(self) -> Path:
        return self.sentiment_cache_dir or self.models_dir / ".cache" / "sentiment"
