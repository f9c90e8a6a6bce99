"""Recommender settings: the runtime's ``CBEC_*`` settings plus the service's own."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.runtime.config import RuntimeSettings


class RecommenderSettings(RuntimeSettings):
    events_path: Path = Field(
        Path("data/recommender/events.sqlite3"), description="SQLite event store (RecordInteractions, items)."
    )
    events_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: durable against power loss; NORMAL: against a killed process only."
    )
    embeddings_cache: Path = Path("data/recommender/embeddings.sqlite3")
    max_k: int = Field(500, ge=1, le=10_000, description="Largest k a request may ask for.")
    max_interactions_per_call: int = Field(1000, ge=1, le=100_000)
    max_items_per_call: int = Field(256, ge=1, le=10_000)
    personalise_min_events: int = Field(
        3,
        ge=1,
        description="A user the model never saw is served by content similarity until this many events.",
    )
    explain_items: int = Field(3, ge=1, le=20)
    faiss_threads: int = Field(
        1, ge=1, le=256, description="OpenMP threads per search (1 suits many small calls)."
    )
