"""Helpers every service's tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from services.runtime.config import RuntimeSettings

S = TypeVar("S", bound=RuntimeSettings)


def local_settings(cls: type[S], models_dir: Path, **fields: Any) -> S:
    """Settings for a server under test: loopback, ephemeral ports, no metrics endpoint, CPU."""
    base: dict[str, Any] = dict(
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        metrics_enabled=False,
        models_dir=models_dir,
        device="cpu",
    )
    return cls(**{**base, **fields})
