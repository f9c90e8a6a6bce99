"""Typed configuration read from the environment (prefix ``CBEC_``) and validated at start.

A bad value stops start-up with a message naming the environment variable, not a traceback.

Names: a field of ``RuntimeSettings`` is ``CBEC_<FIELD>`` in every service; a field a service's subclass
declares is ``CBEC_<SERVICE>_<FIELD>`` (``services/runtime/registry.py``). pydantic-settings has one
``env_prefix`` per class, so the service prefix is given to each own field as its validation alias here
(a few lines in ``RuntimeSettings``), and field names passed as arguments are mapped to those aliases
rather than enabling ``validate_by_name``, with which pydantic-settings would also read ``CBEC_<FIELD>``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .registry import ENV_PREFIX, SERVICES, calls

# gRPC and metrics ports per service (services/runtime/registry.py); the environment overrides them.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {s.name: (s.grpc_port, s.metrics_port) for s in SERVICES.values()}

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
    # Every client channel to another service (services/runtime/channel.py, services/runtime/breaker.py).
    reconnect_max_backoff_s: float = Field(2.0, gt=0, le=120)
    retry_max_attempts: int = Field(3, ge=1, le=5, description="gRPC retryPolicy.maxAttempts (1 = off).")
    retry_initial_backoff_s: float = Field(0.05, gt=0, le=10)
    retry_max_backoff_s: float = Field(0.5, gt=0, le=60)
    retry_throttle_max_tokens: int = Field(10, ge=1, le=1000, description="gRPC retryThrottling.")
    retry_throttle_token_ratio: float = Field(0.1, gt=0, le=1)
    breaker_failure_threshold: int = Field(5, ge=1, le=10_000, description="Consecutive failures.")
    breaker_open_s: float = Field(5.0, gt=0, le=3600, description="Open time before one trial call.")
    breaker_min_principals: int = Field(
        2,
        ge=1,
        le=1000,
        description="Distinct principals whose INTERNAL/UNKNOWN/DATA_LOSS errors it takes to open a "
        "breaker (1: any caller's errors open it).",
    )
    # Tracing (services/runtime/tracing.py): off unless an OTLP endpoint or a file is set.
    trace_otlp_endpoint: str = Field(
        "", description="OTLP/gRPC collector: http://host:4317 (plaintext) or https://host:4317 (TLS)."
    )
    trace_file: Path | None = Field(None, description="Append spans to this file as OTLP JSON lines.")
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces recorded (a caller's traceparent decides its own)."
    )

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

    @field_validator("trace_otlp_endpoint")
    @classmethod
    def _trace_endpoint(cls, value: str) -> str:
        value = value.strip()
        if value and not re.match(r"^https?://[^/\s]+(:\d+)?/?$", value):
            raise ValueError("must be http://host:port or https://host:port (an OTLP/gRPC collector)")
        return value

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

    # --- per-service prefixes (services/runtime/registry.py) -------------------------------------------
    # A field declared here is CBEC_<FIELD> in every service, with one meaning. A field a service's
    # subclass declares is CBEC_<SERVICE>_<FIELD> (a field already named <service>_... keeps that name):
    # its env name becomes the field's validation alias, so no two services share a variable.
    #: field name -> environment variable, for the fields of this class that have a service prefix.
    prefixed_env: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Declare a ``<upstream>_addr`` field for each service the registry says this one calls
        (``CBEC_<SERVICE>_<UPSTREAM>_ADDR``, default the upstream's port on loopback, as ``make run``
        starts it), unless the class declares it itself."""
        super().__init_subclass__(**kwargs)
        service = cls.__dict__.get("service")
        if not isinstance(service, str):
            return
        # The class's own dict (not a copy): pydantic collects the fields from it after this hook.
        annotations = cls.__dict__.get("__annotations__")  # noqa: RUF063
        if annotations is None:
            annotations = {}
            cls.__annotations__ = annotations
        for upstream in calls(service):
            name = f"{upstream}_addr"
            if name not in annotations:
                annotations[name] = str
                setattr(
                    cls,
                    name,
                    Field(
                        f"127.0.0.1:{SERVICES[upstream].grpc_port}",
                        description=f"gRPC target of the {upstream} service (host:port, dns:///name:port).",
                    ),
                )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        service = cls.model_fields["service"].default
        prefixed = dict(cls.prefixed_env)
        for name, info in cls.model_fields.items():
            if name in RuntimeSettings.model_fields or name in prefixed:
                continue
            if not isinstance(service, str) or not service:
                raise TypeError(f"{cls.__name__} declares {name} but no `service` default to prefix it with")
            if info.validation_alias is not None or info.alias is not None:
                raise TypeError(
                    f"{cls.__name__}.{name}: the service prefix names the variable; drop the alias"
                )
            own = f"{service.lower()}_"
            prefixed[name] = f"{ENV_PREFIX}{own.upper()}{name.removeprefix(own).upper()}"
            info.validation_alias = prefixed[name]
        if prefixed != cls.prefixed_env:
            cls.prefixed_env = prefixed
            cls.model_rebuild(force=True)

    def __init__(self, **values: Any) -> None:
        # Code and tests pass field names; the model validates prefixed fields by their variable's name
        # (not by field name too: pydantic-settings would then also read CBEC_<FIELD> for them).
        names = type(self).prefixed_env
        super().__init__(**{names.get(k, k): v for k, v in values.items()})

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Every field and the environment variable it is read from."""
        return {name: cls.prefixed_env.get(name) or env_var_name(name) for name in cls.model_fields}

    def upstream_address(self, name: str) -> str:
        """Where this service calls ``name`` (a service it calls in the registry)."""
        return str(getattr(self, f"{name}_addr"))


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
        # A service's own field is validated under its variable's name (CBEC_<SERVICE>_<FIELD>).
        name = field if field.startswith(ENV_PREFIX) else env_var_name(field)
        lines.append(f"  {name}{shown}: {err['msg']}")
    return "\n".join(lines)


def unread_old_names(cls: type[RuntimeSettings], environ: Mapping[str, str]) -> list[str]:
    """Warnings for variables set under a service field's name from before the service prefixes
    (``CBEC_MAX_K`` for ``CBEC_RECOMMENDER_MAX_K``): nothing reads them any more, which would otherwise
    go unnoticed. A name that a service may read as its own (``CBEC_<SERVICE>_...``) or a runtime setting
    is not reported: each image holds only its own service's code, so the others' classes cannot be asked."""
    old = {env_var_name(name): new for name, new in cls.prefixed_env.items() if env_var_name(name) != new}
    shared = set(RuntimeSettings.env_names().values())
    owned = tuple(f"{ENV_PREFIX}{name.upper()}_" for name in SERVICES)
    return [
        f"{name} is not read any more: use {old[name]}"
        for name in sorted(old)
        if name in environ and name not in shared and not name.startswith(owned)
    ]


def load_settings(cls: type[S], service: str, **overrides: Any) -> S:
    """Read and validate settings; on error print which variable is wrong and exit(2)."""
    for warning in unread_old_names(cls, os.environ):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        return cls(service=service, **overrides)
    except ValidationError as exc:
        message = describe_validation_error(exc)
        print(message, file=sys.stderr)
        raise ConfigError(2) from exc
