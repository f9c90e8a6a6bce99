"""The whole suite as ``make run`` starts it, for the abuse tests and ``make bench-abuse``.

Every service that ``tools.launcher.discover()`` finds, and the gateway, run as their own
processes (``python -m <module>``) with the environment the launcher gives them (``CBEC_GATEWAY_ENV=dev``,
embedded state under one folder, the internal token file, the gateway in front) and the listen
addresses they default to, as under ``make run``; only the ports are free ones rather than the fixed
ones, so that a test never collides with a developer's ``make run``. Models are the small real
versions of ``tests/deploy/tiny_models.py`` (a few seconds to build) unless a models folder is given;
the chat store gets the demo orders ``make run`` puts there.

Chat runs without an LLM (answers from articles), as the other test harnesses do: generation would
only slow every chat call, and nothing here is about the LLM.

The gateway holds three API keys: ``healthy`` and ``abuser`` (storefront keys bound to two shoppers,
``USERS``, with every scope but ``admin``) and ``admin`` (every scope, no user); JWTs signed with
``jwt_secret`` carry a user as their subject.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.runtime.registry import SERVICES

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = SERVICES["gateway"].calls
# Scopes of a shopper's storefront key: every backend and the aggregations, not the model-admin API.
SHOPPER_SCOPES = ["gateway", *BACKENDS]
#: The shopper each storefront key is bound to (users of the tiny recommender's synthetic shop).
USERS = {"healthy": "U000001", "abuser": "U000002"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_tiny_models(models_dir: Path, work: Path) -> dict[str, str]:
    """Small real model versions of every service (``tests/deploy/tiny_models.py``)."""
    from tests.deploy.tiny_models import build_all

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return build_all(models_dir, work)


def transaction(**over: Any) -> dict[str, Any]:
    """A valid order as the storefront sends it (JSON names), five minutes old; ``over`` replaces fields."""
    occurred = datetime.now(UTC) - timedelta(minutes=5)
    tx: dict[str, Any] = {
        "transactionId": f"tx-{uuid.uuid4().hex[:12]}",
        "cardFingerprint": "card-abuse-1",
        "deviceId": "device-abuse-1",
        "ipCountry": "DE",
        "billingCountry": "DE",
        "shippingCountry": "DE",
        "amount": 42.5,
        "currency": "EUR",
        "occurredTime": occurred.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "paymentMethod": "card",
    }
    return {**tx, **over}


@dataclass
class Process:
    """One service process: its ports, its log, and what the kernel says about it."""

    name: str
    module: str
    grpc_port: int
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        """Resident memory now (``VmRSS`` of ``/proc/<pid>/status``), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for {self.name} (pid {self.pid})")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return str(r.read().decode())


@dataclass
class Suite:
    work: Path
    models_dir: Path
    processes: dict[str, Process]
    http_port: int
    keys: dict[str, str]
    jwt_secret: str
    models: str  # what the models are, for reports: "tiny" or the folder given
    internal_token: str  # the services' shared secret (``services/runtime/access.py``)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def address(self, name: str) -> str:
        return self.processes[name].address

    def trusted_metadata(
        self, user: str = "", scopes: tuple[str, ...] = ("*",)
    ) -> tuple[tuple[str, str], ...]:
        """What the gateway sends a backend: the internal token and the identity it verified."""
        from services.runtime.access import identity_metadata

        return identity_metadata(self.internal_token, user, "abuse-suite", scopes)

    def jwt(self, sub: str, scopes: str = " ".join(SHOPPER_SCOPES), ttl_s: float = 600) -> str:
        import jwt

        claims = {"sub": sub, "scope": scopes, "exp": int(time.time() + ttl_s)}
        return str(jwt.encode(claims, self.jwt_secret, algorithm="HS256"))

    def gateway_metric(self, name: str, **labels: str) -> float:
        """The sum of one gateway metric's samples that carry ``labels`` (0 when there are none)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.processes["gateway"].metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def breaker_state(self, backend: str) -> float:
        """The gateway's breaker for ``backend``: 0 closed, 1 half-open, 2 open."""
        return self.gateway_metric("gateway_breaker_state", backend=backend)

    def rss_mb(self) -> dict[str, float]:
        return {name: round(p.rss_mb(), 1) for name, p in self.processes.items() if p.alive}

    def dead(self) -> list[str]:
        """Processes that exited, with their status."""
        return [
            f"{p.name} exited with status {p.proc.returncode}"
            for p in self.processes.values()
            if p.proc is not None and p.proc.poll() is not None
        ]


def _keys_document(keys: dict[str, str]) -> str:
    def entry(key_id: str, key: str, scopes: list[str], user: str | None = None) -> dict[str, Any]:
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = {"id": key_id, "sha256": digest, "scopes": scopes, "rate_per_s": 100_000, "burst": 100_000}
        return {**found, "user": user} if user else found

    return json.dumps(
        {
            "keys": [
                entry("healthy", keys["healthy"], SHOPPER_SCOPES, USERS["healthy"]),
                entry("abuser", keys["abuser"], SHOPPER_SCOPES, USERS["abuser"]),
                entry("admin", keys["admin"], ["*"]),
            ]
        }
    )


def _environment(work: Path, models_dir: Path) -> dict[str, str]:
    """What the launcher gives every service (``tools.launcher.environment``)."""
    from tools.launcher import environment

    base = {k: v for k, v in os.environ.items() if not k.startswith("CBEC_")}
    base.update({"CBEC_STATE_DIR": str(work / "var"), "OPENBLAS_NUM_THREADS": "1"})
    return environment(base, models_dir, grace=2)


@contextlib.contextmanager
def running_suite(
    work: Path,
    models_dir: Path | None = None,
    gateway_env: dict[str, str] | None = None,
    startup_timeout: float = 240.0,
) -> Iterator[Suite]:
    """Every service and the gateway as processes on free ports; stopped (SIGTERM) afterwards.

    ``models_dir`` None: tiny models are built into ``work/models`` first. ``gateway_env``: extra
    ``CBEC_*`` settings of the gateway (e.g. a short breaker open time).
    """
    from services.runtime.access import TOKEN_ENV, read_token
    from tools.launcher import discover, service_environment

    work.mkdir(parents=True, exist_ok=True)
    label = str(models_dir) if models_dir is not None else "tiny"
    if models_dir is None:
        models_dir = work / "models"
        build_tiny_models(models_dir, work / "build")
    keys = {name: f"abuse-{name}-{secrets.token_hex(16)}" for name in ("healthy", "abuser", "admin")}
    jwt_secret = secrets.token_hex(32)
    (work / "keys.json").write_text(_keys_document(keys))
    (work / "jwt.secret").write_text(jwt_secret)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = _environment(work, models_dir)
    # The launcher's processes on free ports; it gives each its ports and its upstreams' addresses.
    specs = discover({s.name: free_port() for s in discover()})
    processes = {
        s.name: Process(s.name, s.module, s.grpc_port, free_port(), logs / f"{s.name}.log") for s in specs
    }
    http_port = free_port()
    per_service: dict[str, dict[str, str]] = {
        "chat": {"CBEC_CHAT_LLM_BACKEND": "none"},
        "vision": {"CBEC_VISION_DATA_DIR": str(work / "vision-data")},
        "gateway": {
            "CBEC_GATEWAY_API_KEYS_FILE": str(work / "keys.json"),
            "CBEC_GATEWAY_JWT_SECRET_FILE": str(work / "jwt.secret"),
            **(gateway_env or {}),
        },
    }
    if "chat" in processes:
        seed_chat_orders(work / "var")
    token = read_token(Path(env[TOKEN_ENV]))
    suite = Suite(work, models_dir, processes, http_port, keys, jwt_secret, label, token)
    try:
        for spec in specs:
            name, p = spec.name, processes[spec.name]
            service_env = {
                **service_environment(spec, specs, env, http_port, None),
                "CBEC_METRICS_PORT": str(p.metrics_port),
                **per_service.get(name, {}),
            }
            with open(p.log_path, "ab") as log:
                p.proc = subprocess.Popen(
                    [sys.executable, "-m", p.module], cwd=ROOT, env=service_env, stdout=log, stderr=log
                )
        _wait_all(suite, startup_timeout)
        yield suite
    finally:
        stop(suite)


def seed_chat_orders(state_dir: Path) -> None:
    """The demo orders ``make run`` puts in the chat store (``services/chat/defaults.py``)."""
    from services.chat.defaults import DEMO_ORDERS
    from services.chat.store import ChatStore
    from services.runtime.state import StateConfig

    store = ChatStore.open(StateConfig(state_dir=state_dir))
    try:
        store.put_orders(DEMO_ORDERS)
    finally:
        store.close()


def _wait_all(suite: Suite, timeout: float) -> None:
    """Until every process reports SERVING; fails at once, with its log, when one exits."""
    import asyncio

    from services.runtime.probe import check

    async def one(p: Process) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not p.alive:
                return f"{p.name} exited with status {p.proc.returncode if p.proc else '?'}"
            if await check(p.address) == "SERVING":
                return None
            await asyncio.sleep(0.25)
        return f"{p.name} not SERVING after {timeout:.0f}s"

    async def every() -> list[tuple[Process, str | None]]:
        ps = list(suite.processes.values())
        return list(zip(ps, await asyncio.gather(*(one(p) for p in ps)), strict=True))

    failed = [(p, why) for p, why in asyncio.run(every()) if why]
    if failed:
        tails = "\n".join(f"--- {why} ---\n{p.log_tail()}" for p, why in failed)
        raise RuntimeError(f"the suite did not start:\n{tails}")


def stop(suite: Suite, grace: float = 10.0) -> None:
    for p in suite.processes.values():
        if p.alive:
            assert p.proc is not None
            p.proc.send_signal(signal.SIGTERM)
    for p in suite.processes.values():
        if p.proc is None:
            continue
        try:
            p.proc.wait(grace)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
