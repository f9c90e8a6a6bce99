"""Authentication, scopes and per-principal rate limits, shared by the HTTP bridge and the gRPC port.

Credentials (HTTP header or gRPC metadata):
- ``x-api-key: <key>``: looked up by its SHA-256 in the keys file (``CBEC_GATEWAY_API_KEYS_FILE``,
  mounted from a Kubernetes Secret), or the same document in ``CBEC_GATEWAY_API_KEYS_SHA256``. It holds
  hashes only, so reading it does not reveal a key::

      {"keys": [{"id": "storefront", "sha256": "<hex>", "scopes": ["gateway", "recommender"],
                 "rate_per_s": 50, "burst": 100}]}

  Keys are 256-bit random tokens (``python -m gateway.keys new``), so a plain SHA-256 is enough; a
  slow password hash would only add latency. The file is re-read when it changes (key rotation
  without a restart).
- ``authorization: Bearer <JWT>``: HS256 with ``CBEC_GATEWAY_JWT_SECRET_FILE`` or RS256/ES256 with
  ``CBEC_GATEWAY_JWT_PUBLIC_KEY_FILE``; ``exp`` is required, ``iss``/``aud`` are checked when configured;
  scopes come from the ``scope`` (space-separated) or ``scopes`` claim; the principal is ``sub``.
- Development only (``CBEC_GATEWAY_ENV=dev``): the key in ``CBEC_GATEWAY_DEV_API_KEY`` (default
  ``cbec-dev-key``) with every scope. Never accepted with ``CBEC_GATEWAY_ENV=prod``.

Identity: the end user of a request comes from the credentials, never from the body: a JWT's ``sub``,
or the ``"user"`` a keys-file entry binds its key to. A request body's user id field (``user_id`` in
recommender, chat, risk transactions and the aggregations) is filled with that user when empty and
refused (PERMISSION_DENIED naming the field) when it names someone else, unless the credentials hold
the ``act_as_user`` scope (a trusted service, e.g. the storefront's backend), in which case it names
the user the call is for. The gateway passes the identity to the services as trusted metadata with
the internal token (``services/runtime/access.py``).

Scopes: a method needs the scope its proto declares (``option (cbec.common.v1.access)``: ``admin`` for
model loads and data erasure), else its backend's name (``recommender``, ``sentiment``, ``vision``,
``risk``, ``chat``), ``gateway`` for the aggregations, or ``admin`` for the model-admin API; ``*``
grants all (``act_as_user`` included).
Rate limits: a token bucket per principal (its own rate from the keys file, else the defaults); past
it, RESOURCE_EXHAUSTED with ``RetryInfo`` (HTTP 429 with ``Retry-After``). Embedded (one gateway) the
buckets are in memory; with ``CBEC_STATE_BACKEND=shared`` they live in Redis, so the limit holds across
every gateway replica. Redis unreachable never fails a request: each replica then limits on its own
with its share of the rate (``1 / CBEC_GATEWAY_RATE_LIMIT_REPLICAS``) until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.runtime.access import read_token
from services.runtime.errors import Violation, quote

from .config import GatewaySettings, parse_keys_document, read_keys_file
from .descriptors import MethodInfo
from .errors import GatewayError
from .metrics import GatewayMetrics

log = logging.getLogger("cbec.gateway.auth")
API_KEY_HEADER = "x-api-key"
AUTHORIZATION = "authorization"
principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)

# gRPC services that answer without credentials: probes must work without a key.
PUBLIC_GRPC_SERVICES = frozenset({"grpc.health.v1.Health"})
#: Lets a (service) principal name in the request body the user a call is for.
ACT_AS_USER = "act_as_user"
#: Request fields that name the end user a call is for.
USER_FIELD = "user_id"


@dataclass(frozen=True)
class Principal:
    id: str
    scopes: frozenset[str]
    rate_per_s: float
    burst: float
    kind: str  # api_key | jwt | dev
    #: The end user these credentials are for (JWT ``sub``, a keys-file entry's ``user``); "" if none.
    user: str = ""

    def allows(self, scope: str | None) -> bool:
        return scope is None or "*" in self.scopes or scope in self.scopes

    @property
    def acts_for_users(self) -> bool:
        return self.allows(ACT_AS_USER)


@dataclass(frozen=True)
class Identity:
    """Who a request is from and for, as the backends are told (``backends.call_metadata``)."""

    principal: Principal
    user: str
    token: str | None  # the internal token the services require


identity_var: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("identity", default=None)
#: The internal token of this process's gateway, for backend calls made outside a request (none by
#: default): one gateway per process, as deployed (tests' gateways share one token).
_gateway_token: str | None = None


def gateway_token() -> str | None:
    return _gateway_token


def current_identity() -> Identity | None:
    """The identity of the request being served; None before it is authenticated. (The bridge resets
    ``principal_var`` per request, and connections are kept alive across requests, so an identity
    from an earlier request on the same connection is ignored.)"""
    identity = identity_var.get()
    if identity is None or identity.principal is not principal_var.get():
        return None
    return identity


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def unauthenticated(message: str, reason: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAUTHENTICATED,
        message,
        reason=reason,
        headers={"WWW-Authenticate": 'Bearer realm="cbec-ai", ApiKey header="x-api-key"'},
    )


class KeyStore:
    """API keys by SHA-256; re-reads its file when the file changes."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.path: Path | None = settings.api_keys_file
        self._by_hash: dict[str, Principal] = {}
        self._dev: dict[str, Principal] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if settings.env == "dev":
            self._dev[hash_key(settings.dev_api_key)] = Principal(
                "dev", frozenset({"*"}), settings.rate_limit_per_s, settings.rate_limit_burst, "dev"
            )
        self._static: dict[str, Principal] = {}
        if settings.api_keys_sha256:
            self._static = self._principals(
                parse_keys_document(settings.api_keys_sha256, "CBEC_GATEWAY_API_KEYS_SHA256")
            )
        if self.path is not None:
            self._load()

    @property
    def dev_key_enabled(self) -> bool:
        return bool(self._dev)

    def _load(self) -> None:
        assert self.path is not None
        stat = self.path.stat()
        self._by_hash = self._principals(read_keys_file(self.path))
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        log.info("loaded %d API keys", len(self._by_hash))

    def _principals(self, entries: list[dict[str, Any]]) -> dict[str, Principal]:
        by_hash: dict[str, Principal] = {}
        for entry in entries:
            digest = str(entry["sha256"]).lower().removeprefix("sha256:")
            by_hash[digest] = Principal(
                id=str(entry.get("id") or f"key-{digest[:8]}"),
                scopes=frozenset(str(s) for s in entry.get("scopes", [])),
                rate_per_s=float(entry.get("rate_per_s", self.settings.rate_limit_per_s)),
                burst=float(entry.get("burst", self.settings.rate_limit_burst)),
                kind="api_key",
                user=str(entry.get("user") or "").strip(),
            )
        return by_hash

    def maybe_reload(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < self.settings.keys_reload_s:
            return
        self._checked = now
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._load()
        except (OSError, ValueError) as exc:  # keep the keys we have
            log.error("cannot reload API keys from %s: %s", self.path, exc)

    def lookup(self, key: str) -> Principal | None:
        digest = hash_key(key)
        return self._by_hash.get(digest) or self._static.get(digest) or self._dev.get(digest)


class JwtVerifier:
    def __init__(self, settings: GatewaySettings) -> None:
        import jwt  # PyJWT

        self._jwt = jwt
        self.settings = settings
        if settings.jwt_secret_file is not None:
            self.key: Any = settings.jwt_secret_file.read_bytes().strip()
            self.algorithms = ["HS256", "HS384", "HS512"]
        elif settings.jwt_public_key_file is not None:
            self.key = settings.jwt_public_key_file.read_bytes()
            self.algorithms = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
        else:
            raise ValueError("no JWT key configured")
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        now = time.time()
        if cached is not None and cached[1] > now:
            return cached[0]
        s = self.settings
        try:
            claims = self._jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=s.jwt_audience or None,
                issuer=s.jwt_issuer or None,
                leeway=s.jwt_leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": bool(s.jwt_audience)},
            )
        except self._jwt.PyJWTError as exc:
            raise unauthenticated(f"invalid token: {exc}", "TOKEN_INVALID") from None
        scopes = claims.get("scope", "")
        scope_set = set(scopes.split()) if isinstance(scopes, str) else set()
        extra = claims.get("scopes", [])
        if isinstance(extra, list):
            scope_set.update(str(x) for x in extra)
        principal = Principal(
            id=f"jwt:{claims['sub']}",
            scopes=frozenset(scope_set),
            rate_per_s=s.rate_limit_per_s,
            burst=s.rate_limit_burst,
            kind="jwt",
            user=str(claims["sub"]),
        )
        self._cache[token] = (principal, float(claims["exp"]))
        if len(self._cache) > 10_000:
            self._cache.popitem(last=False)
        return principal


class RateLimiter:
    """A token bucket per principal (bounded: idle buckets are dropped first)."""

    def __init__(self, max_principals: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._max = max_principals
        self._clock = clock

    def check(self, principal: Principal) -> float | None:
        """None when admitted; otherwise the seconds until a call would be."""
        now = self._clock()
        bucket = self._buckets.get(principal.id)
        if bucket is None:
            bucket = [principal.burst, now]
            self._buckets[principal.id] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(principal.id)
            bucket[0] = min(principal.burst, bucket[0] + (now - bucket[1]) * principal.rate_per_s)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return None
        return (1.0 - bucket[0]) / principal.rate_per_s


# One check, atomically, in Redis. KEYS[1]: the principal's bucket; ARGV: rate per second, burst.
# Time comes from Redis (TIME), so the gateways' clocks play no part. The bucket expires once it would
# have refilled completely: from then on it is the same as a new one, so idle principals leave no keys.
# Returns {1, "0"} when admitted, else {0, seconds until a token} (a string: Lua numbers would be cut
# to integers on the way out).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'us')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = burst
elseif now > last then
  tokens = math.min(burst, tokens + (now - last) * rate / 1000000)
end
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'us', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, string.format('%.6f', wait)}
"""
RATE_KEY_PREFIX = "cbec:gateway:rate:"


class SharedRateLimiter:
    """Token buckets in Redis, one Lua script (EVALSHA) per check, shared by every gateway replica.

    Redis unreachable, slow (past ``timeout_s``) or failing: the check falls back to this replica's
    in-memory bucket with the per-replica share of the principal's rate and burst (``1 / replicas``),
    logs the switch once and counts it in the metrics. While degraded, requests never wait on Redis: a
    background probe pings it every ``probe_s`` and global limits resume as soon as it answers.
    """

    def __init__(
        self,
        client: Any,
        replicas: int = 1,
        timeout_s: float = 0.25,
        probe_s: float = 1.0,
        metrics: GatewayMetrics | None = None,
        local: RateLimiter | None = None,
        prefix: str = RATE_KEY_PREFIX,
    ) -> None:
        self.client = client
        self.replicas = max(1, int(replicas))
        self.timeout_s = timeout_s
        self.probe_s = probe_s
        self.metrics = metrics
        self.local = local or RateLimiter()
        self.prefix = prefix
        self._script = client.register_script(TOKEN_BUCKET_LUA)
        self._shared = True
        self._probe: asyncio.Task[None] | None = None
        self._set_gauge(True)

    @property
    def shared(self) -> bool:
        """True while the limits are global (Redis answers); False while this replica limits alone."""
        return self._shared

    def key(self, principal_id: str) -> str:
        return self.prefix + principal_id

    async def check(self, principal: Principal) -> float | None:
        """None when admitted; otherwise the seconds until a call would be."""
        if self._shared:
            try:
                allowed, wait = await asyncio.wait_for(
                    self._script(keys=[self.key(principal.id)], args=[principal.rate_per_s, principal.burst]),
                    self.timeout_s,
                )
                return None if int(allowed) == 1 else max(float(wait), 0.001)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable, timed out, loading, read-only...: never fail the call
                self._degrade(exc)
        if self.metrics is not None:
            self.metrics.rate_limit_fallback.inc()
        return self.local.check(self._share(principal))

    def _share(self, principal: Principal) -> Principal:
        if self.replicas == 1:
            return principal
        return dataclasses.replace(
            principal,
            rate_per_s=principal.rate_per_s / self.replicas,
            burst=max(1.0, principal.burst / self.replicas),
        )

    def _set_gauge(self, shared: bool) -> None:
        if self.metrics is not None:
            self.metrics.rate_limit_shared.set(1 if shared else 0)

    def _degrade(self, exc: BaseException) -> None:
        if self._shared:
            self._shared = False
            self._set_gauge(False)
            log.warning(
                "rate-limit store unreachable: limiting on this replica with 1/%d of each rate until it "
                "answers (%s: %s)",
                self.replicas,
                type(exc).__name__,
                str(exc)[:200],
            )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            try:
                await asyncio.wait_for(self.client.ping(), max(self.timeout_s, 1.0))
            except asyncio.CancelledError:
                raise
            except Exception:
                continue
            self._shared = True
            self._set_gauge(True)
            log.info("rate-limit store answers again: limits are global across replicas")
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
        with contextlib.suppress(Exception):
            await self.client.aclose()


class Authenticator:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics, redis: Any | None = None) -> None:
        """``redis`` (an asyncio client; the shared backend) makes the rate limits global."""
        self.settings = settings
        self.metrics = metrics
        self.keys = KeyStore(settings)
        self.internal_token = (
            read_token(settings.internal_token_file) if settings.internal_token_file is not None else None
        )
        global _gateway_token
        _gateway_token = self.internal_token
        self.jwt = (
            JwtVerifier(settings)
            if settings.jwt_secret_file is not None or settings.jwt_public_key_file is not None
            else None
        )
        self.limiter: RateLimiter | SharedRateLimiter = (
            SharedRateLimiter(
                redis,
                replicas=settings.rate_limit_replicas,
                timeout_s=settings.rate_limit_timeout_s,
                metrics=metrics,
            )
            if redis is not None
            else RateLimiter()
        )
        if self.keys.dev_key_enabled:
            log.warning(
                "CBEC_GATEWAY_ENV=dev: the development API key is accepted; set CBEC_GATEWAY_ENV=prod and a "
                "keys file or JWT key in any shared or production deployment"
            )

    def _fail(self, error: GatewayError) -> GatewayError:
        self.metrics.auth_failures.labels(error.reason or error.code.name).inc()
        return error

    def authenticate(self, api_key: str | None, authorization: str | None) -> Principal:
        """The caller, from ``x-api-key`` or ``authorization: Bearer``; raises UNAUTHENTICATED."""
        self.keys.maybe_reload()
        if api_key:
            principal = self.keys.lookup(api_key.strip())
            if principal is None:
                raise self._fail(unauthenticated("API key is not valid", "API_KEY_INVALID"))
            return principal
        if authorization:
            scheme, _, credential = authorization.strip().partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential:
                raise self._fail(unauthenticated("authorization must be 'Bearer <token>'", "TOKEN_INVALID"))
            if credential.count(".") == 2 and self.jwt is not None:
                try:
                    return self.jwt.verify(credential)
                except GatewayError as exc:
                    raise self._fail(exc) from None
            principal = self.keys.lookup(credential)  # an API key sent as a bearer token
            if principal is None:
                raise self._fail(unauthenticated("bearer token is not valid", "TOKEN_INVALID"))
            return principal
        raise self._fail(
            unauthenticated("credentials required: x-api-key header or Bearer token", "CREDENTIALS_MISSING")
        )

    def authorize(self, principal: Principal, scope: str | None) -> None:
        if not principal.allows(scope):
            raise self._fail(
                GatewayError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the credentials lack the scope {scope!r}",
                    reason="SCOPE_MISSING",
                    metadata={"scope": scope or ""},
                )
            )

    async def close(self) -> None:
        if isinstance(self.limiter, SharedRateLimiter):
            await self.limiter.close()

    async def limit(self, principal: Principal) -> None:
        limiter = self.limiter
        wait = (
            await limiter.check(principal)
            if isinstance(limiter, SharedRateLimiter)
            else limiter.check(principal)
        )
        if wait is not None:
            self.metrics.rate_limited.labels(principal.id if principal.kind != "jwt" else "jwt").inc()
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of {principal.rate_per_s:g} calls/s exceeded for {principal.id}",
                retry_after_s=wait,
                reason="RATE_LIMITED",
            )

    async def admit(self, api_key: str | None, authorization: str | None, scope: str | None) -> Principal:
        principal = self.authenticate(api_key, authorization)
        self.authorize(principal, scope)
        await self.limit(principal)
        principal_var.set(principal)
        identity_var.set(Identity(principal, principal.user, self.internal_token))
        return principal


# --- the user a request is for ------------------------------------------------------------------------
_user_fields: dict[str, tuple[tuple[FieldDescriptor, ...], ...]] = {}


def user_fields(info: MethodInfo) -> tuple[tuple[FieldDescriptor, ...], ...]:
    """Every ``user_id`` string field of the method's request, as chains of fields from the top
    (``transaction.user_id``, ``interactions[].user_id``); computed once per method."""
    found = _user_fields.get(info.key)
    if found is None:
        found = _user_fields[info.key] = tuple(_walk(info.method.input_type, (), 0))
    return found


def _walk(message: Descriptor, chain: tuple[FieldDescriptor, ...], depth: int) -> Any:
    for f in message.fields:
        if f.name == USER_FIELD and f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated:
            yield (*chain, f)
        elif (
            f.type == FieldDescriptor.TYPE_MESSAGE
            and depth < 3
            and not f.message_type.GetOptions().map_entry
            and not f.message_type.full_name.startswith("google.")
        ):
            yield from _walk(f.message_type, (*chain, f), depth + 1)


def _holders(message: Message, chain: tuple[FieldDescriptor, ...], path: str) -> Any:
    """(message holding the last field, its path) for every place ``chain`` reaches in ``message``."""
    head, rest = chain[0], chain[1:]
    if not rest:
        yield message, f"{path}{head.name}"
        return
    if head.is_repeated:
        for i, child in enumerate(getattr(message, head.name)):
            yield from _holders(child, rest, f"{path}{head.name}[{i}].")
    elif message.HasField(head.name):
        yield from _holders(getattr(message, head.name), rest, f"{path}{head.name}.")


def bind_user(info: MethodInfo, message: Message) -> str:
    """Check and fill the request's user id fields from the credentials; returns the user the call is
    for (also what the backends are told). Raises PERMISSION_DENIED naming the field when the body
    names another user and the credentials may not act for users.

    Methods that declare an access scope (``admin``: e.g. ``ForgetUser``) are exempt: there the field
    names whom the operation is about, not who asks."""
    identity = current_identity()
    if identity is None:
        return ""
    principal = identity.principal
    own = principal.user
    users: set[str] = set()
    if not info.access_scope:
        for chain in user_fields(info):
            for holder, path in _holders(message, chain, ""):
                name = chain[-1].name
                value = getattr(holder, name)
                if not value:
                    if own:
                        setattr(holder, name, own)
                        users.add(own)
                    continue
                if value != own and not principal.acts_for_users:
                    why = (
                        f"names user {quote(value)}, but these credentials are for user {quote(own)}"
                        if own
                        else f"names user {quote(value)}, but these credentials are not bound to a user "
                        f"and lack the {ACT_AS_USER!r} scope"
                    )
                    raise GatewayError(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"{path} (userId) {why}: leave it empty or send the caller's own user",
                        violations=(Violation(path, why),),
                        reason="USER_NOT_ALLOWED",
                        metadata={"field": path},
                    )
                users.add(value)
    user = next(iter(users)) if len(users) == 1 else own
    if user != identity.user:
        identity_var.set(dataclasses.replace(identity, user=user))
    return user


async def admit_grpc_call(
    auth: Authenticator, scope_of: Callable[[str], str | None], service: str, method: str, context: Any
) -> None:
    """Authentication on the gateway's gRPC port, run by the runtime's interceptor before the request is
    read (``admit_call``): a refusal is an ordinary ``ServiceError`` turned into a rich status with the
    request id, and an unauthenticated or rate-limited caller costs no validation."""
    if service in PUBLIC_GRPC_SERVICES:
        return
    api_key = authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == API_KEY_HEADER:
            api_key = str(value)
        elif key == AUTHORIZATION:
            authorization = str(value)
    await auth.admit(api_key, authorization, scope_of(f"/{service}/{method}"))
