"""Typed configuration read from the environment (prefix ``CBEC_``) and validated at start.

A bad value stops start-up with a message naming the environment variable, not a traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CBEC_"

# gRPC and metrics ports per service; the environment overrides them.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "gateway": (50050, 9100),
    "recommender": (50051, 9101),
    "chat": (50052, 9102),
    "sentiment": (50053, 9103),
    "vision": (50054, 9104),
    "risk": (50055, 9105),
}

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class RuntimeSettings(BaseSettings):
    """Settings every service shares. Services subclass it to add their own fields."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    service: str = Field(description="Service name; selects default ports and the model store folder.")
    host: str = Field(
        "127.0.0.1",
        description="Listen address. Services are reached only through the gateway: loopback unless "
        "a deployment sets CBEC_HOST=0.0.0.0 (the chart does, behind its NetworkPolicy).",
    )
    grpc_port: int = Field(0, ge=0, le=65535, description="0 picks a free port (tests).")
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_enabled: bool = True
    metrics_host: str = Field(
        "", description="Listen address of the metrics endpoint; empty: the same as CBEC_HOST."
    )
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    max_concurrent_calls: int = Field(256, ge=1, le=100_000)
    grace_period_s: float = Field(20.0, ge=0, le=600)
    keepalive_time_s: float = Field(30.0, gt=0)
    max_connection_age_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Close client connections after this long (gracefully), so clients re-resolve and "
        "spread over replicas added since they connected.",
    )
    models_dir: Path = Path("models")
    model_version: str = Field("", description="Pin a model version; empty loads the newest valid one.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = Field(False, description="Log every call (not only failures) at INFO.")
    batch_max_size: int = Field(32, ge=1, le=4096)
    batch_max_delay_ms: float = Field(5.0, ge=0, le=10_000)
    batch_queue_size: int = Field(1024, ge=1, le=1_000_000)
    # State (services/runtime/state.py): embedded SQLite files for one replica, or shared stores.
    state_backend: Literal["embedded", "shared"] = Field(
        "embedded", description="embedded: SQLite under state_dir (one replica); shared: PostgreSQL + Redis."
    )
    state_dir: Path = Field(Path("var"), description="Writable folder for SQLite files and local caches.")
    database_url: str = Field("", description="postgresql://user@host:port/db (shared backend).")
    database_password: SecretStr = SecretStr("")
    redis_url: str = Field("", description="redis://host:port/db (shared backend).")
    redis_password: SecretStr = SecretStr("")
    state_timeout_s: float = Field(2.0, gt=0, le=60, description="Connect / pool wait / socket timeout.")
    state_pool_max: int = Field(8, ge=1, le=1000)
    state_check_s: float = Field(5.0, gt=0, le=3600, description="Store health-check period.")
    model_poll_s: float = Field(
        0.0, ge=0, le=86400, description="Check the model store for a newer version this often (0 = off)."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate; with tls_key_file turns TLS on.")
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; set = require client certs (mTLS)."
    )
    # Calls between services (gateway -> services, chat -> sentiment): see services/runtime/access.py.
    internal_token_file: Path | None = Field(
        None,
        description="File holding the secret the gateway and the services share (at least 32 characters); "
        "set: every call but health and reflection must carry it, and admin RPCs become possible.",
    )
    backend_tls_ca_file: Path | None = Field(None, description="PEM CA that signs the services' certs.")
    backend_tls_cert_file: Path | None = Field(None, description="Client cert for mTLS to the services.")
    backend_tls_key_file: Path | None = None
    backend_tls_server_name: str = Field("", description="Override the TLS name checked on backends.")

    @model_validator(mode="after")
    def _tls_files(self) -> RuntimeSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("CBEC_TLS_CERT_FILE and CBEC_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("CBEC_TLS_CLIENT_CA_FILE needs CBEC_TLS_CERT_FILE and CBEC_TLS_KEY_FILE")
        for path in (self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @model_validator(mode="after")
    def _service_links(self) -> RuntimeSettings:
        from .access import read_token

        for path in (self.backend_tls_ca_file, self.backend_tls_cert_file, self.backend_tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"file {path} does not exist")
        if (self.backend_tls_cert_file is None) != (self.backend_tls_key_file is None):
            raise ValueError("CBEC_BACKEND_TLS_CERT_FILE and CBEC_BACKEND_TLS_KEY_FILE must be set together")
        if self.backend_tls_cert_file is not None and self.backend_tls_ca_file is None:
            raise ValueError("CBEC_BACKEND_TLS_CERT_FILE needs CBEC_BACKEND_TLS_CA_FILE")
        if self.internal_token_file is not None:
            read_token(self.internal_token_file)
        return self

    @model_validator(mode="after")
    def _state(self) -> RuntimeSettings:
        if self.state_backend == "shared" and not (self.database_url or self.redis_url):
            raise ValueError("CBEC_STATE_BACKEND=shared needs CBEC_DATABASE_URL and/or CBEC_REDIS_URL")
        self.state_dir = self.state_dir.expanduser().absolute()
        models = self.models_dir.expanduser().absolute()
        if self.state_dir == models or models in self.state_dir.parents:
            raise ValueError("CBEC_STATE_DIR must not be inside CBEC_MODELS_DIR (mounted read-only)")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_ports(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ports = DEFAULT_PORTS.get(str(data.get("service", "")))
            if ports:
                data.setdefault("grpc_port", ports[0])
                data.setdefault("metrics_port", ports[1])
        return data

    @property
    def service_models_dir(self) -> Path:
        return self.models_dir / self.service


class ConfigError(SystemExit):
    """Raised (and exits with status 2) when the environment holds an invalid value."""


S = TypeVar("S", bound=RuntimeSettings)


def env_var_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        if not field:  # a check across settings: its message names the variables itself
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f"={value!r}"
        lines.append(f"  {env_var_name(field)}{shown}: {err['msg']}")
    return "\n".join(lines)


def load_settings(cls: type[S], service: str, **overrides: Any) -> S:
    """Read and validate settings; on error print which variable is wrong and exit(2)."""
    try:
        return cls(service=service, **overrides)
    except ValidationError as exc:
        message = describe_validation_error(exc)
        print(message, file=sys.stderr)
        raise ConfigError(2) from exc
