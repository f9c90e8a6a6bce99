"""``make run``: prepare default models, start every service that exists and the gateway as separate
processes, wait until each reports SERVING, print the endpoints, stop them all on Ctrl-C/SIGTERM.

A service exists when its package has ``__main__.py``. First the demo catalogue is built
(``demo/catalogue.py``: one set of products, photos, reviews and shoppers for every service). Then
before a service starts, its ``defaults.py`` (if any) is run as ``python -m services.<name>.defaults``:
it prepares the packaged data and the default model (the recommender's is trained on the catalogue)
and skips what is already there, so re-running ``make run`` is quick. Once everything is SERVING, the
catalogue's photos and reviews are loaded into vision and sentiment through their APIs
(``demo/seed.py``), and the gateway serves the storefront on the catalogue at ``/``.

The services listen on 127.0.0.1 only (the runtime's default) and the gateway is the one public
listener. Every process gets ``CBEC_INTERNAL_TOKEN_FILE``: a random secret made once in
``$CBEC_STATE_DIR/internal-token`` (mode 0600), which the gateway and chat send and the services
require (``services/runtime/access.py``).
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

from .access import TOKEN_ENV, new_token
from .config import DEFAULT_PORTS
from .probe import check

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("recommender", "chat", "sentiment", "vision", "risk", "gateway")
DEMO_AWARE = ("recommender", "chat")  # their defaults take --demo-dir (the catalogue they build on)
console = Console(stderr=True, width=110)


@dataclass
class Spec:
    name: str
    module: str
    package_dir: Path

    @property
    def grpc_port(self) -> int:
        return int(os.environ.get(f"CBEC_{self.name.upper()}_GRPC_PORT", DEFAULT_PORTS[self.name][0]))

    @property
    def metrics_port(self) -> int:
        return DEFAULT_PORTS[self.name][1]


def discover() -> list[Spec]:
    specs = []
    for name in ORDER:
        package_dir = ROOT / "gateway" if name == "gateway" else ROOT / "services" / name
        if (package_dir / "__main__.py").exists():
            module = "gateway" if name == "gateway" else f"services.{name}"
            specs.append(Spec(name, module, package_dir))
    return specs


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

    from .access import read_token

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


def endpoints(specs: list[Spec], log_dir: Path) -> Table:
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
    if any(s.name == "gateway" for s in specs):
        http_port = os.environ.get("CBEC_HTTP_PORT", "8080")
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
    # (production defaults to CBEC_ENV=prod, which refuses it).
    env.setdefault("CBEC_ENV", "dev")
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    parser.add_argument("--exit-when-ready", action="store_true", help="stop everything once all are SERVING")
    args = parser.parse_args()

    specs = discover()
    if not specs:
        console.print("[red]no service exists yet (no services/<name>/__main__.py)[/]")
        sys.exit(1)
    env = environment(os.environ, args.models_dir, args.grace)
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
            service_env = {
                **env,
                "CBEC_GRPC_PORT": str(spec.grpc_port),
                "CBEC_METRICS_PORT": str(spec.metrics_port),
            }
            if spec.name == "gateway" and demo_dir is not None:
                service_env.setdefault("CBEC_DEMO_CATALOGUE_DIR", str(demo_dir))
                service_env.setdefault("CBEC_PRODUCT_IMAGES_DIR", str(demo_dir / "images"))
                # The demo's reviews are dated in the year before a fixed day: read ten years back.
                service_env.setdefault("CBEC_PRODUCT_SENTIMENT_WINDOW_DAYS", "3650")
                service_env.setdefault("CBEC_FEED_SENTIMENT_WINDOW_DAYS", "3650")
            procs[spec.name] = subprocess.Popen(
                [sys.executable, "-m", spec.module], cwd=ROOT, env=service_env, stdout=log, stderr=log
            )
        failures = asyncio.run(wait_all(specs, procs, args.ready_timeout))
        if failures:
            for failure in failures:
                console.print(f"[red]{failure}[/] (see {args.log_dir})")
            sys.exit(1)
        if demo_dir is not None:
            seed_demo(demo_dir, specs, env, lambda: stopping)
        console.print(endpoints(specs, args.log_dir))
        if any(s.name == "gateway" for s in specs):
            console.print(
                f"[bold green]open http://127.0.0.1:{os.environ.get('CBEC_HTTP_PORT', '8080')}/[/] "
                "to see the shop"
            )
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
