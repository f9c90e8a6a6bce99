"""Risk service settings: the runtime's ``CBEC_*`` settings plus ``CBEC_RISK_*`` ones."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.runtime.config import RuntimeSettings

from .features import DEFAULT_RATES_PATH, MAX_WINDOW_MS


class RiskSettings(RuntimeSettings):
    service: str = "risk"
    # A checkout waits on every millisecond: flush a batch at once with whatever calls are queued
    # (the runtime default waits 5 ms for a batch to fill). CBEC_BATCH_MAX_DELAY_MS still overrides.
    batch_max_delay_ms: float = Field(0.0, ge=0, le=10_000)
    batch_max_size: int = Field(64, ge=1, le=4096)
    # Big enough that an oversized batch (100k transactions is ~10 MB) reaches the service and is refused
    # with a field violation naming the limit, rather than by the transport with a bare status.
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)

    risk_state_path: Path = Field(
        Path("var/risk/state.sqlite3"),
        description="SQLite file with velocity state, scored transactions and outcome labels.",
    )
    risk_state_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL", description="NORMAL survives a killed process; FULL also survives power loss."
    )
    risk_event_retention_days: float = Field(35.0, gt=0, le=3650)
    risk_scored_retention_days: float = Field(180.0, gt=0, le=3650)
    risk_rates_path: Path = DEFAULT_RATES_PATH
    risk_rates_max_age_days: float = Field(
        7.0, gt=0, description="Older rates keep serving but are reported stale in metrics and logs."
    )
    risk_rates_check_s: float = Field(60.0, gt=0, description="How often the rates file is re-read.")
    risk_max_transactions: int = Field(
        10_000, ge=1, le=1_000_000, description="Most transactions one ScoreTransactions call may carry."
    )
    risk_max_future_s: float = Field(300.0, ge=0, description="Allowed clock skew for occurred_time.")
    risk_reasons: int = Field(3, ge=1, le=22, description="Reason codes per assessment.")
    risk_review_threshold: float | None = Field(None, ge=0, le=1, description="Overrides the model's.")
    risk_decline_threshold: float | None = Field(None, ge=0, le=1, description="Overrides the model's.")
    risk_anomaly_threshold: float | None = Field(None, ge=0, le=1, description="Overrides the model's.")
    risk_predict_threads: int = Field(1, ge=1, le=64, description="LightGBM threads per predict call.")

    @model_validator(mode="after")
    def _retention_covers_windows(self) -> RiskSettings:
        if self.risk_event_retention_days * 86_400_000 < MAX_WINDOW_MS:
            raise ValueError(
                f"risk_event_retention_days must be at least {MAX_WINDOW_MS / 86_400_000:g} "
                "(the longest velocity window)"
            )
        return self
