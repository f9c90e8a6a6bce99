"""Gateway settings (``CBEC_GATEWAY_*`` variables) on top of the runtime's (``CBEC_*``).

Credentials. Production API keys live in a keys file (``CBEC_GATEWAY_API_KEYS_FILE``, JSON, mounted from a
Kubernetes Secret) or in ``CBEC_GATEWAY_API_KEYS_SHA256`` (the same JSON from a secret environment variable);
either holds only SHA-256 hashes of the keys, never the keys themselves; make an entry with
``python -m gateway.keys new --id NAME --scopes gateway,recommender``. JWTs are verified with
``CBEC_GATEWAY_JWT_SECRET_FILE`` (HS256) or ``CBEC_GATEWAY_JWT_PUBLIC_KEY_FILE`` (RS256/ES256).

Development key. Only when ``CBEC_GATEWAY_ENV=dev`` (``make run`` sets it; the default is ``prod``)
the key in ``CBEC_GATEWAY_DEV_API_KEY`` (default ``cbec-dev-key``, with every scope) is accepted as well and
a warning is logged at start. With ``CBEC_GATEWAY_ENV=prod`` the development key is never
accepted, and the gateway refuses to start unless a keys file or a JWT key is configured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from services.runtime.config import RuntimeSettings
from services.runtime.registry import SERVICES

#: Backends the gateway knows, named like their package (``cbec.<name>.v1``) and service folder: the
#: services the registry says it calls (each has a ``<name>_addr`` field, ``CBEC_GATEWAY_<NAME>_ADDR``).
BACKENDS = SERVICES["gateway"].calls
DEV_API_KEY = "cbec-dev-key"


class GatewaySettings(RuntimeSettings):
    """Everything the gateway reads from the environment; see the module docstring for credentials."""

    service: str = "gateway"
    # The gateway is the one public listener (gRPC and, through http_host, the HTTP bridge).
    host: str = "0.0.0.0"
    # The gateway's own gRPC messages are small; the runtime's 8 MiB default is for model inputs.
    max_message_bytes: int = Field(1024 * 1024, ge=1024, le=512 * 1024 * 1024)

    # --- backends ---------------------------------------------------------------------------------
    # <backend>_addr for each of BACKENDS comes from the registry (RuntimeSettings.__init_subclass__).
    backend_timeout_s: float = Field(
        2.0, gt=0, le=600, description="Longest a backend call of an aggregation may take."
    )
    backend_timeouts: dict[str, float] = Field(
        default_factory=dict, description='Per-backend overrides as JSON, e.g. {"risk": 0.3}.'
    )
    backend_max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    default_deadline_s: float = Field(
        5.0, gt=0, le=600, description="Deadline of a call whose caller set none (aggregations, bridge)."
    )
    max_deadline_s: float = Field(60.0, gt=0, le=3600, description="Cap on a unary caller's deadline.")
    stream_deadline_s: float = Field(300.0, gt=0, le=86400, description="Deadline of a streaming call.")
    deadline_reserve_ms: float = Field(
        25.0, ge=0, le=10_000, description="Kept back from the caller's deadline to assemble the answer."
    )
    # CBEC_BACKEND_TLS_* (TLS/mTLS to the services), the reconnect backoff, CBEC_RETRY_* and
    # CBEC_BREAKER_* are runtime settings: every client channel (chat's to sentiment too) reads them.

    # --- aggregation ------------------------------------------------------------------------------
    feed_default_k: int = Field(20, ge=1, le=500)
    max_k: int = Field(100, ge=1, le=500)
    feed_sentiment_window_days: int = Field(90, ge=1, le=3650)
    product_sentiment_window_days: int = Field(
        30, ge=1, le=3650, description="The product page's review report window (the sentiment default)."
    )
    fanout_concurrency: int = Field(32, ge=1, le=1024, description="Per-request cap on parallel calls.")
    product_images_dir: Path | None = Field(
        None, description="Catalogue images as <product_id>.{jpg,jpeg,png,webp}; enables visual search."
    )
    demo_catalogue_dir: str = Field(
        "", description="Folder of the demo catalogue (products.json, images/) the storefront shows."
    )

    # --- HTTP bridge ------------------------------------------------------------------------------
    http_host: str = ""
    http_port: int = Field(8080, ge=0, le=65535)
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024, description="Unary HTTP body (and NDJSON line)."
    )
    max_stream_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=8 * 1024 * 1024 * 1024)
    cors_origins: str = Field("", description="Comma-separated allowed origins; * allows any.")
    cors_max_age_s: int = Field(600, ge=0, le=86400)
    ready_requires: str = Field(
        "*", description="Backends /readyz needs SERVING: comma-separated names, * = all, empty = none."
    )
    # Slow or oversized clients (issue 15): each bounds how long or how much one connection may hold.
    http_header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Longest a request head may take from its first byte to its end."
    )
    http_body_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="Longest a unary request body (or one NDJSON line of a stream) may take to arrive.",
    )
    http_idle_timeout_s: float = Field(
        75.0,
        gt=0,
        le=86400,
        description="Keep-alive: a connection with no complete request for this long (after it opened "
        "or after its last response) is closed. Keep it above a load balancer's idle timeout.",
    )
    http_max_header_bytes: int = Field(
        8190, ge=1024, le=1024 * 1024, description="Longest request line or single header line."
    )
    http_max_headers: int = Field(100, ge=8, le=10_000, description="Most header lines in one request.")

    # --- authentication ---------------------------------------------------------------------------
    env: Literal["dev", "prod"] = Field(
        "prod", description="dev accepts CBEC_GATEWAY_DEV_API_KEY; prod never."
    )
    dev_api_key: str = Field(DEV_API_KEY, min_length=8)
    api_keys_file: Path | None = Field(None, description="JSON file of SHA-256 key hashes (a Secret).")
    api_keys_sha256: str = Field(
        "", description="The same JSON document as the keys file, from a secret env var (Helm secretEnv)."
    )
    jwt_secret_file: Path | None = Field(None, description="HS256 shared secret.")
    jwt_public_key_file: Path | None = Field(None, description="PEM public key for RS256/ES256.")
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: float = Field(30.0, ge=0, le=3600)
    rate_limit_per_s: float = Field(50.0, gt=0, le=1_000_000, description="Default per principal.")
    rate_limit_burst: float = Field(100.0, ge=1, le=10_000_000)
    rate_limit_replicas: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Gateway replicas expected; while Redis is unreachable each allows 1/N of every rate.",
    )
    rate_limit_timeout_s: float = Field(
        0.25, gt=0, le=10, description="Longest a rate-limit check waits for Redis before deciding locally."
    )
    keys_reload_s: float = Field(5.0, gt=0, le=3600, description="How often the keys file is re-read.")

    # --- fairness (gateway.fairness) -----------------------------------------------------------------
    backend_max_in_flight: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="Per backend: in-flight calls from this gateway beyond which keys get a fair share "
        "each (default: one backend replica's CBEC_MAX_CONCURRENT_CALLS).",
    )
    backend_min_share: int = Field(
        8, ge=1, le=1_000_000, description="In-flight calls to a backend a key may always have."
    )
    min_backend_timeout_ms: float = Field(
        1.0,
        ge=0,
        le=10_000,
        description="A backend call left with less time fails at once with DEADLINE_EXCEEDED, uncalled.",
    )

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        for path in (
            self.api_keys_file,
            self.jwt_secret_file,
            self.jwt_public_key_file,
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"file {path} does not exist")
        if self.jwt_secret_file is not None and self.jwt_public_key_file is not None:
            raise ValueError("set CBEC_GATEWAY_JWT_SECRET_FILE or CBEC_GATEWAY_JWT_PUBLIC_KEY_FILE, not both")
        unknown = set(self.backend_timeouts) - set(BACKENDS)
        if unknown:
            raise ValueError(f"CBEC_GATEWAY_BACKEND_TIMEOUTS names unknown backends {sorted(unknown)}")
        if any(v <= 0 for v in self.backend_timeouts.values()):
            raise ValueError("CBEC_GATEWAY_BACKEND_TIMEOUTS values must be > 0")
        bad = set(self.required_backends) - set(BACKENDS)
        if bad:
            raise ValueError(f"CBEC_GATEWAY_READY_REQUIRES names unknown backends {sorted(bad)}")
        if self.api_keys_file is not None:
            read_keys_file(self.api_keys_file)
        if self.api_keys_sha256:
            parse_keys_document(self.api_keys_sha256, "CBEC_GATEWAY_API_KEYS_SHA256")
        if self.jwt_secret_file is not None and len(self.jwt_secret_file.read_bytes().strip()) < 32:
            raise ValueError("CBEC_GATEWAY_JWT_SECRET_FILE must hold at least 32 bytes")
        if self.jwt_public_key_file is not None:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                load_pem_public_key(self.jwt_public_key_file.read_bytes())
            except ValueError:
                raise ValueError("CBEC_GATEWAY_JWT_PUBLIC_KEY_FILE is not a PEM public key") from None
        if self.env == "prod" and not self.has_production_credentials:
            raise ValueError(
                "CBEC_GATEWAY_ENV=prod needs CBEC_GATEWAY_API_KEYS_FILE, CBEC_GATEWAY_API_KEYS_SHA256 or a "
                "JWT key (CBEC_GATEWAY_JWT_SECRET_FILE / CBEC_GATEWAY_JWT_PUBLIC_KEY_FILE); the development "
                "key is refused in prod"
            )
        return self

    @property
    def has_production_credentials(self) -> bool:
        files = (self.api_keys_file, self.jwt_secret_file, self.jwt_public_key_file)
        return bool(self.api_keys_sha256) or any(p is not None for p in files)

    def backend_address(self, name: str) -> str | None:
        """``CBEC_GATEWAY_<NAME>_ADDR``: a field for the registry's backends, else (a backend the
        registry does not know yet, such as a new chart block) read from the environment here."""
        if name in BACKENDS:
            return self.upstream_address(name)
        return os.environ.get(f"{SERVICES['gateway'].env_prefix}{name.upper()}_ADDR") or None

    def backend_timeout(self, name: str) -> float:
        return self.backend_timeouts.get(name, self.backend_timeout_s)

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def required_backends(self) -> tuple[str, ...]:
        value = self.ready_requires.strip()
        if value == "*":
            return BACKENDS
        return tuple(n.strip() for n in value.split(",") if n.strip())

    @property
    def http_bind_host(self) -> str:
        return self.http_host or self.host


def read_keys_file(path: Path) -> list[dict[str, Any]]:
    """The entries of an API keys file, checked: ``{"keys": [{"id", "sha256", "scopes", ...}]}``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"API keys file {path} is not readable: {exc}") from None
    return parse_keys_document(text, f"API keys file {path}")


def parse_keys_document(text: str, source: str) -> list[dict[str, Any]]:
    """The entries of a keys document (the keys file's content, or ``CBEC_GATEWAY_API_KEYS_SHA256``),
    checked."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not readable JSON: {exc}") from None
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{source} must be {{"keys": [...]}}')
    for i, entry in enumerate(entries):
        digest = (
            str(entry.get("sha256", "")).lower().removeprefix("sha256:") if isinstance(entry, dict) else ""
        )
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{source}: keys[{i}].sha256 is not a SHA-256 hex digest")
        scopes = entry.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ValueError(f"{source}: keys[{i}].scopes must be a list of strings")
        user = entry.get("user")
        if user is not None and (not isinstance(user, str) or not user.strip() or len(user) > 256):
            raise ValueError(f"{source}: keys[{i}].user must be a non-empty string of at most 256 characters")
        for limit in ("rate_per_s", "burst"):
            value = entry.get(limit)
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise ValueError(f"{source}: keys[{i}].{limit} must be a positive number")
    return entries
