"""``make run``'s suite on the demo catalogue, once per test session, for the tests that use the product
as a person would: the storefront in a browser, the aggregated routes over every product, the READMEs'
examples.

It is started by ``make run``'s own launcher (``tools.launcher``: every service and the
gateway as processes, ``CBEC_GATEWAY_ENV=dev`` so the development key works, the demo catalogue loaded
through the APIs once everything is SERVING) with a small demo catalogue (``demo.catalogue``, the
first products of the full one) and small real model versions (``tests.deploy.tiny_models``; the
recommender's trained on that catalogue) instead of the default training, on free ports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("recommender", "chat", "sentiment", "vision", "risk")
READY_LINE = "to see the shop"  # the launcher's last line once the catalogue is loaded
DEV_KEY = "cbec-dev-key"


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): the launcher starts its services one
    after another, and a port the kernel hands out as free can meanwhile become the source port of
    another process's outgoing connection (a risk replica once failed to bind so)."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@dataclass
class DemoSuite:
    url: str
    work: Path
    demo_dir: Path
    grpc_ports: dict[str, int]
    proc: subprocess.Popen[bytes]
    catalogue: dict = field(default_factory=dict)

    @property
    def products(self) -> list[dict]:
        return self.catalogue["products"]

    def post(self, path: str, body: dict, key: str = DEV_KEY) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"x-api-key": key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def logs(self) -> str:
        tails = {
            p.name: p.read_text(errors="replace")[-1500:] for p in sorted((self.work / "logs").glob("*.log"))
        }
        launcher = (self.work / "launcher.log").read_text(errors="replace")[-3000:]
        return launcher + "\n" + json.dumps(tails, indent=1)


def start(work: Path, products: int = 24, reviews_per_product: int = 6, users: int = 120) -> DemoSuite:
    """The suite on the first ``products`` of the demo catalogue (shoppers touch about 9 each, so
    most products are left to recommend to each)."""
    from demo.catalogue import Params, build
    from tests.deploy.tiny_models import build_all

    demo_dir = work / "demo"
    params = Params(
        products=products, reviews_per_product=reviews_per_product, users=users, events_per_user=6.0
    )
    catalogue = build(demo_dir, params, progress=False)
    models = work / "models"
    build_all(models, work / "model-work", demo_dir=demo_dir, skip=frozenset({"chat"}))
    seed_chat(work / "state", demo_dir)
    # Chat's answers are shown in the README as make run gives them: its real training (about a
    # minute: intent, retrieval and the faithfulness check's calibration) instead of a tiny version.
    from services.chat.train import train as train_chat
    from services.runtime.state import StateConfig

    train_chat(models, StateConfig(state_dir=work / "state"))
    http_port = free_port()
    grpc_ports = {name: free_port() for name in (*SERVICES, "gateway")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBEC_")}
    env.update(
        {
            "CBEC_STATE_DIR": str(work / "state"),
            "CBEC_METRICS_ENABLED": "false",  # the launcher's fixed metrics ports may be taken
            "CBEC_DEVICE": "cpu",
            "OPENBLAS_NUM_THREADS": "1",
        }
    )
    launcher_log = (work / "launcher.log").open("wb")
    command = [
        sys.executable,
        "-m",
        "tools.launcher",
        "--no-prepare",  # the tiny models above instead of the default training
        "--http-port",
        str(http_port),
        *(f"--port={name}={port}" for name, port in grpc_ports.items()),
        "--models-dir",
        str(models),
        "--log-dir",
        str(work / "logs"),
        "--demo-dir",
        str(demo_dir),
        "--ready-timeout",
        "150",
        "--grace",
        "2",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=launcher_log, stderr=subprocess.STDOUT)
    launcher_log.close()
    suite = DemoSuite(f"http://127.0.0.1:{http_port}", work, demo_dir, grpc_ports, proc, catalogue)
    deadline = time.monotonic() + 240
    while True:
        log = (work / "launcher.log").read_text(errors="replace")
        if READY_LINE in log and http_get(f"{suite.url}/readyz")[0] == 200:
            break
        failed = "loading the demo catalogue into" in log
        if failed or proc.poll() is not None or time.monotonic() > deadline:
            stop(suite)
            pytest.fail(f"the demo suite did not come up (launcher exit {proc.poll()})\n{suite.logs()}")
        time.sleep(0.5)
    return suite


def seed_chat(state_dir: Path, demo_dir: Path) -> None:
    """What ``make run``'s chat defaults put in the store: the knowledge base and the demo orders
    (with the catalogue's products), without training the full chat model."""
    from services.chat.defaults import demo_orders, seed_knowledge
    from services.chat.knowledge import Embedder
    from services.chat.store import ChatStore
    from services.runtime.state import StateConfig

    store = ChatStore.open(StateConfig(state_dir=state_dir))
    try:
        seed_knowledge(store, Embedder())
        store.put_orders(demo_orders(demo_dir))
    finally:
        store.close()


def stop(suite: DemoSuite) -> None:
    if suite.proc.poll() is None:
        suite.proc.send_signal(signal.SIGTERM)
        try:
            suite.proc.wait(60)
        except subprocess.TimeoutExpired:
            suite.proc.kill()
            suite.proc.wait(10)


@pytest.fixture(scope="session")
def demo_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoSuite]:
    suite = start(tmp_path_factory.mktemp("demo-suite"))
    try:
        yield suite
    finally:
        stop(suite)
