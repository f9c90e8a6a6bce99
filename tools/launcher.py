"""``make run``: prepare default models, start every service that exists and the gateway as separate
processes, wait until each reports SERVING, print the endpoints, stop them all on Ctrl-C/SIGTERM.

The processes, their ports and who calls whom come from the service registry
(``services/runtime/registry.py``); a service exists when its package has ``__main__.py``. Services start
after the services they call. First the demo catalogue is built (``demo/catalogue.py``: one set of
products, photos, reviews and shoppers for every service). Then before a service starts, its
``defaults.py`` (if any) is run as ``python -m services.<name>.defaults``: it prepares the packaged data
and the default model (the recommender's is trained on the catalogue) and skips what is already there,
so re-running ``make run`` is quick. Once everything is SERVING, the catalogue's photos and reviews are
loaded into vision and sentiment through their APIs (``demo/seed.py``), and the gateway serves the
storefront on the catalogue at ``/``.

Every process gets the caller's environment plus what all of them share (``CBEC_MODELS_DIR``,
``CBEC_STATE_DIR``, ``CBEC_INTERNAL_TOKEN_FILE``, ...), and only its own differences: its ports
(``CBEC_GRPC_PORT``, ``CBEC_METRICS_PORT``) and where its upstreams listen
(``CBEC_<SERVICE>_<UPSTREAM>_ADDR``). ``--port NAME=PORT`` moves a service's gRPC port (its callers
follow); ``--http-port`` (default ``CBEC_GATEWAY_HTTP_PORT`` or 8080) is the gateway's HTTP bridge.

The services listen on 127.0.0.1 only (the runtime's default) and the gateway is the one public
listener. ``CBEC_INTERNAL_TOKEN_FILE`` is a random secret made once in
``$CBEC_STATE_DIR/internal-token`` (mode 0600), which the gateway and chat send and the services
require (``services/runtime/access.py``).

This is a developer's tool, so it lives in tools/ and not in the runtime that every image ships.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.runtime.access import TOKEN_ENV, new_token
from services.runtime.probe import check
from services.runtime.registry import SERVICES, Service, start_order

ROOT = Path(__file__).resolve().parents[1]
DEMO_AWARE = ("recommender", "chat")  # their defaults take --demo-dir (the catalogue they build on)
GATEWAY = SERVICES["gateway"]
HTTP_PORT_ENV = f"{GATEWAY.env_prefix}HTTP_PORT"
console = Console(stderr=True, width=110)


@dataclass
class Spec:
    service: Service
    grpc_port: int

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def module(self) -> str:
        return self.service.entry_module

    @property
    def metrics_port(self) -> int:
        return self.service.metrics_port

    @property
    def package_dir(self) -> Path:
        return ROOT / self.service.code_dir


def discover(grpc_ports: Mapping[str, int] | None = None) -> list[Spec]:
    """The registry's services whose code exists, callees first; ``grpc_ports`` moves some of them."""
    ports = dict(grpc_ports or {})
    unknown = set(ports) - set(SERVICES)
    if unknown:
        raise ValueError(f"no such service {sorted(unknown)}; the registry has {sorted(SERVICES)}")
    specs = [Spec(SERVICES[name], ports.get(name, SERVICES[name].grpc_port)) for name in start_order()]
    return [s for s in specs if (s.package_dir / "__main__.py").exists()]


def service_environment(
    spec: Spec, specs: list[Spec], env: Mapping[str, str], http_port: int, demo_dir: Path | None
) -> dict[str, str]:
    """One child's environment: the shared one plus its ports and its upstreams' addresses."""
    out = {**env, "CBEC_GRPC_PORT": str(spec.grpc_port), "CBEC_METRICS_PORT": str(spec.metrics_port)}
    running = {s.name: s for s in specs}
    for upstream in spec.service.calls:
        if upstream in running:
            out[spec.service.address_env(upstream)] = f"127.0.0.1:{running[upstream].grpc_port}"
    if spec.service is GATEWAY:
        out[HTTP_PORT_ENV] = str(http_port)
        if demo_dir is not None:
            prefix = GATEWAY.env_prefix
            out.setdefault(f"{prefix}DEMO_CATALOGUE_DIR", str(demo_dir))
            out.setdefault(f"{prefix}PRODUCT_IMAGES_DIR", str(demo_dir / "images"))
            # The demo's reviews are dated in the year before a fixed day: read ten years back.
            out.setdefault(f"{prefix}PRODUCT_SENTIMENT_WINDOW_DAYS", "3650")
            out.setdefault(f"{prefix}FEED_SENTIMENT_WINDOW_DAYS", "3650")
    return out


def prepare(spec: Spec, env: dict[str, str], demo_dir: Path) -> None:
    if (spec.package_dir / "defaults.py").exists():
        console.rule(f"[bold]{spec.name}[/]: default data and model")
        extra = ["--demo-dir", str(demo_dir)] if spec.name in DEMO_AWARE else []
        command = [sys.executable, "-m", f"{spec.module}.defaults", *extra]
        subprocess.run(command, cwd=ROOT, env=env, check=True)


def build_demo(demo_dir: Path, env: dict[str, str]) -> None:
    console.rule("[bold]demo catalogue[/]: products, photos, reviews and shoppers for every service")
    command = [sys.executable, "-m", "demo.catalogue", "--out", str(demo_dir)]
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def seed_demo(demo_dir: Path, specs: list[Spec], env: dict[str, str], stopping: Callable[[], bool]) -> None:
    """Load the catalogue's photos and reviews into the running services (skipped where present);
    a service that fails to take them is reported and the rest keep running."""
    from demo.seed import run as seed
    from services.runtime.access import read_token

    console.rule("[bold]demo catalogue[/]: loading photos and reviews through the APIs")
    addresses = {s.name: f"127.0.0.1:{s.grpc_port}" for s in specs if s.name in ("vision", "sentiment")}
    loaded = seed(demo_dir, addresses, read_token(Path(env[TOKEN_ENV])), stopping)
    for name, why in loaded.items():
        if isinstance(why, str):  # the service keeps running: the shop lacks that part
            console.print(f"[red]loading the demo catalogue into {name} failed: {why}[/]")
    counts = [f"{name} {n} new" for name, n in loaded.items() if isinstance(n, int)]
    console.print("demo catalogue loaded: " + (", ".join(counts) or "nothing"))


async def wait_all(specs: list[Spec], procs: dict[str, subprocess.Popen[bytes]], timeout: float) -> list[str]:
    async def one(spec: Spec) -> str | None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if procs[spec.name].poll() is not None:
                return f"{spec.name} exited with status {procs[spec.name].returncode}"
            if await check(f"127.0.0.1:{spec.grpc_port}") == "SERVING":
                return None
            await asyncio.sleep(0.25)
        return f"{spec.name} not SERVING after {timeout:.0f}s"

    with console.status("waiting for every service to report SERVING"):
        results = await asyncio.gather(*(one(s) for s in specs))
    return [r for r in results if r]


def endpoints(specs: list[Spec], log_dir: Path, http_port: int) -> Table:
    table = Table(title="cbec-ai is up (Ctrl-C stops everything)")
    for column in ("service", "gRPC", "metrics", "log"):
        table.add_column(column)
    for spec in specs:
        table.add_row(
            spec.name,
            f"127.0.0.1:{spec.grpc_port}",
            f"http://127.0.0.1:{spec.metrics_port}/metrics",
            _shown(log_dir / f"{spec.name}.log"),
        )
    if any(s.service is GATEWAY for s in specs):
        table.add_row("HTTP bridge", "", f"http://127.0.0.1:{http_port}", "")
        table.add_row("storefront", "", f"http://127.0.0.1:{http_port}/", "")
    return table


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it (keeps the table narrow)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def internal_token_file(state_dir: Path) -> Path:
    """The shared secret of this machine's services, made (mode 0600) the first time."""
    path = state_dir / "internal-token"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_token() + "\n")
    return path


def environment(base: Mapping[str, str], models_dir: Path, grace: float) -> dict[str, str]:
    """What every process of ``make run`` gets (tests that start the suite their own way use it too)."""
    env = {
        **base,
        "CBEC_MODELS_DIR": str(models_dir.resolve()),
        # Embedded state: one SQLite file per store under one folder, never in the code or models dir.
        "CBEC_STATE_DIR": base.get("CBEC_STATE_DIR", str(ROOT / "var")),
        "CBEC_GRACE_PERIOD_S": str(grace),
    }
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not env.get(TOKEN_ENV):
        env[TOKEN_ENV] = str(internal_token_file(Path(env["CBEC_STATE_DIR"])))
    # make run is a developer's laptop: the gateway accepts its documented development key there
    # (production defaults to CBEC_GATEWAY_ENV=prod, which refuses it).
    env.setdefault(f"{GATEWAY.env_prefix}ENV", "dev")
    # The gateway's API is the one public listener; every metrics endpoint (the gateway's included,
    # which names API keys in its labels) stays on loopback.
    env.setdefault("CBEC_METRICS_HOST", "127.0.0.1")
    return env


def stop_all(procs: dict[str, subprocess.Popen[bytes]], grace: float) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        try:
            proc.wait(grace + 5)
        except subprocess.TimeoutExpired:
            console.print(f"[red]{name} did not stop in time; killing it[/]")
            proc.kill()
            proc.wait()


def _port_option(value: str) -> tuple[str, int]:
    name, sep, port = value.partition("=")
    if not sep or name not in SERVICES or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"want NAME=PORT with NAME one of {', '.join(SERVICES)}: {value!r}")
    return name, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.launcher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "var" / "log")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--no-prepare", action="store_true", help="skip default data and models")
    parser.add_argument(
        "--demo-dir",
        type=Path,
        default=ROOT / "data" / "demo",
        help="the demo catalogue (built unless --no-prepare, loaded once everything is up)",
    )
    parser.add_argument(
        "--port",
        type=_port_option,
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="a service's gRPC port instead of the registry's (repeatable)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        help=f"the gateway's HTTP port (default: {HTTP_PORT_ENV} or {GATEWAY.http_port})",
    )
    parser.add_argument("--exit-when-ready", action="store_true", help="stop everything once all are SERVING")
    args = parser.parse_args(argv)

    specs = discover(dict(args.port))
    if not specs:
        console.print("[red]no service exists yet (no services/<name>/__main__.py)[/]")
        sys.exit(1)
    env = environment(os.environ, args.models_dir, args.grace)
    http_port = args.http_port or int(env.get(HTTP_PORT_ENV) or GATEWAY.http_port or 8080)
    demo_dir: Path | None = args.demo_dir.resolve()  # None: no catalogue to serve
    if not args.no_prepare:
        build_demo(args.demo_dir.resolve(), env)
        for spec in specs:
            prepare(spec, env, args.demo_dir.resolve())
    if not (args.demo_dir / "products.json").exists():
        console.print(f"[yellow]no demo catalogue in {demo_dir}: the shop will be empty[/]")
        demo_dir = None

    args.log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for spec in specs:
            log = open(args.log_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 -- lives as long as the child
            procs[spec.name] = subprocess.Popen(
                [sys.executable, "-m", spec.module],
                cwd=ROOT,
                env=service_environment(spec, specs, env, http_port, demo_dir),
                stdout=log,
                stderr=log,
            )
        failures = asyncio.run(wait_all(specs, procs, args.ready_timeout))
        if failures:
            for failure in failures:
                console.print(f"[red]{failure}[/] (see {args.log_dir})")
            sys.exit(1)
        if demo_dir is not None:
            seed_demo(demo_dir, specs, env, lambda: stopping)
        console.print(endpoints(specs, args.log_dir, http_port))
        if any(s.service is GATEWAY for s in specs):
            console.print(f"[bold green]open http://127.0.0.1:{http_port}/[/] to see the shop")
        while not stopping and not args.exit_when_ready:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    console.print(f"[red]{name} exited with status {proc.returncode}[/]; stopping the rest")
                    stopping = True
            time.sleep(0.5)
    finally:
        console.print("stopping: draining calls in flight")
        stop_all(procs, args.grace)
        console.print("all stopped")


if __name__ == "__main__":
    main()
