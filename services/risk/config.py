"""Risk service settings: the runtime's ``CBEC_*`` settings plus ``CBEC_RISK_*`` ones.

Where state lives is the runtime's business (``CBEC_STATE_BACKEND``, ``CBEC_STATE_DIR``,
``CBEC_DATABASE_URL``, ``CBEC_REDIS_URL``); see ``state.py`` for what the service keeps there.
"""

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

    risk_state_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL",
        description="Commit of each scoring call. NORMAL survives a killed process (embedded: SQLite "
        "synchronous=NORMAL; shared: the commit reaches PostgreSQL, synchronous_commit=off); FULL also "
        "survives a crash of the machine or database host. Outcome labels always commit synchronously.",
    )
    risk_event_retention_days: float = Field(35.0, gt=0, le=3650)
    risk_scored_retention_days: float = Field(180.0, gt=0, le=3650)
    risk_rates_path: Path = DEFAULT_RATES_PATH
    risk_rates_max_age_days: float = Field(
        7.0, gt=0, description="Older rates keep serving but are reported stale in metrics and logs."
    )
    risk_rates_check_s: float = Field(60.0, gt=0, description="How often the rates file is re-read.")
    risk_max_transactions: int = Field(
        10_000,
        ge=1,
        le=10_000,
        description="Most transactions one ScoreTransactions call may carry (INVALID_ARGUMENT past it); "
        "at most the contract's 10,000.",
    )
    risk_max_future_s: float = Field(300.0, ge=0, description="Allowed clock skew for occurred_time.")
    risk_reasons: int = Field(3, ge=1, le=22, description="Reason codes per assessment.")
    risk_review_threshold: float | None = Field(None, ge=0, le=1, description="Overrides the model's.")
    risk_decline_threshold: float | None = Field(None, ge=0, le=1, description="Overrides the model's.")
    risk_anomaly_threshold: float | None = Field(None, ge=0, le=1, description="Overrides the model's.")
    risk_predict_threads: int = Field(1, ge=1, le=64, description="LightGBM threads per predict call.")
    risk_modeldata_dir: Path | None = Field(
        None,
        description="Folder of R modeldata's Rdata.rdb (the credit-risk sets of services.risk.credit); "
        "default: the copy `make setup` unpacks into data/deb, or the installed R library.",
    )
    risk_state_path: str = Field(
        "", exclude=True, description="Removed: set, the service refuses to start (see _no_state_path)."
    )

    @model_validator(mode="after")
    def _no_state_path(self) -> RiskSettings:
        # Removed, not ignored: a deployment that still sets it would silently start on empty state.
        if self.risk_state_path:
            raise ValueError(
                "CBEC_RISK_STATE_PATH was removed: state lives in CBEC_STATE_DIR (risk.sqlite3) or, with "
                "CBEC_STATE_BACKEND=shared, in PostgreSQL and Redis; a file left at "
                "<CBEC_STATE_DIR>/risk/state.sqlite3 is imported at start"
            )
        return self

    @model_validator(mode="after")
    def _retention_covers_windows(self) -> RiskSettings:
        if self.risk_event_retention_days * 86_400_000 < MAX_WINDOW_MS:
            raise ValueError(
                f"risk_event_retention_days must be at least {MAX_WINDOW_MS / 86_400_000:g} "
                "(the longest velocity window)"
            )
        return self
