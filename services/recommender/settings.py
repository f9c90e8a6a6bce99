"""Recommender settings: the runtime's ``CBEC_*`` settings plus the service's own ``CBEC_RECOMMENDER_*``
(``max_k`` is ``CBEC_RECOMMENDER_MAX_K``).

State lives where the runtime says (``CBEC_STATE_BACKEND``): the event store is the embedded SQLite
file ``<CBEC_STATE_DIR>/recommender.sqlite3`` or the shared PostgreSQL. Nothing is written under the
code or the models directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.runtime.config import RuntimeSettings


class RecommenderSettings(RuntimeSettings):
    service: str = "recommender"
    events_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="Embedded store: FULL is durable against power loss; NORMAL against a killed process.",
    )
    embeddings_cache: Path | None = Field(
        None,
        description="Local cache of item text embeddings (a cache: safe to lose); "
        "default <CBEC_STATE_DIR>/recommender/embeddings.sqlite3.",
    )
    fold_in_check_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="Safety re-read of the store's logs (seq > last) in case a change notification was "
        "missed; notifications fold writes in within milliseconds.",
    )
    max_k: int = Field(500, ge=1, le=10_000, description="Largest k a request may ask for.")
    # The contract (recommender.proto) caps a call at these defaults; a setting may only be stricter.
    max_interactions_per_call: int = Field(1000, ge=1, le=1000)
    max_items_per_call: int = Field(256, ge=1, le=256)
    personalise_min_events: int = Field(
        5,
        ge=1,
        description="A user the model never saw is served by content similarity until this many events.",
    )
    explain_items: int = Field(3, ge=1, le=20)
    faiss_threads: int = Field(
        1, ge=1, le=256, description="OpenMP threads per search (1 suits many small calls)."
    )

    @model_validator(mode="after")
    def _embeddings_cache(self) -> RecommenderSettings:
        if self.embeddings_cache is None:
            self.embeddings_cache = (
                self.state_dir.expanduser().absolute() / "recommender" / "embeddings.sqlite3"
            )
        return self
