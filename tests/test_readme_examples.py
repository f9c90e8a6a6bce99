"""Every curl example of the READMEs' HTTP/JSON sections (the project's and the gateway's), run as
written against ``make run``'s set-up.

The suite is started by ``make run``'s own launcher (``services.runtime.launcher``: every service and
the gateway as processes, ``CBEC_ENV=dev`` so the documented development key works), with small real
model versions (``tests.deploy.tiny_models``) instead of the default training, on free ports. Each
command is taken from the README's code block and run by bash as it stands; only ``$GW`` points at the
test's gateway. Every one must get a 2xx.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): the launcher starts its services one
    after another, and a port the kernel hands out as free can meanwhile become the source port of
    another process's outgoing connection (a risk replica once failed to bind so)."""
    import random
    import socket

    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


ROOT = Path(__file__).resolve().parents[1]
#: README -> the heading of the section whose first bash block holds its HTTP examples
READMES = {"README.md": "### Over HTTP/JSON", "gateway/README.md": "## Calling it"}
SERVICES = ("recommender", "chat", "sentiment", "vision", "risk")
STATUS_MARK = "README-EXAMPLE-HTTP-STATUS:"


def readme_examples(readme: str) -> tuple[str, list[str]]:
    """The variable line (``K=...; GW=...``) and each curl command (with its continuation lines) of the
    first bash block in a README's HTTP examples section."""
    path, heading = readme, READMES[readme]
    text = (ROOT / path).read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"{path}: the section {heading!r} has no bash code block"
    lines = block.group(1).splitlines()
    setup, commands = lines[0], []
    for line in lines[1:]:
        if line.startswith("curl "):
            commands.append(line)
        elif line.strip():
            assert commands, f"a line before the first curl command: {line!r}"
            commands[-1] += "\n" + line
    return setup, commands


@pytest.mark.parametrize("readme", sorted(READMES))
def test_the_examples_are_found(readme: str) -> None:
    setup, commands = readme_examples(readme)
    assert "K=" in setup and "GW=" in setup
    assert len(commands) >= 10 and all("$GW" in c for c in commands)


def write_shoe_jpg(folder: Path) -> None:
    """``shoe.jpg`` for the visual-search example: a Fashion-MNIST sneaker when the data set is here,
    else a drawn product photo."""
    from PIL import Image

    from services.vision.data import DataError, load
    from tests.vision import imagegen

    try:
        split = load("test")
        index = int((split.labels == 7).nonzero()[0][0])  # 7: sneaker
        image = Image.fromarray(split.images[index]).convert("RGB").resize((112, 112))
    except DataError:  # the data set is not on this machine
        image = imagegen.draw("circle", "red", seed=1)
    image.save(folder / "shoe.jpg", format="JPEG", quality=90)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``make run``'s launcher on free ports with tiny models; yields (gateway URL, work folder)."""
    from tests.deploy.tiny_models import build_all

    work = tmp_path_factory.mktemp("readme")
    models = work / "models"
    build_all(models, work / "model-work")
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBEC_")}
    env.update(
        {
            "CBEC_STATE_DIR": str(work / "state"),
            "CBEC_HTTP_PORT": str(http_port),
            "CBEC_GATEWAY_GRPC_PORT": str(free_port()),
            "CBEC_METRICS_ENABLED": "false",  # the launcher's fixed metrics ports may be taken
            "CBEC_DEVICE": "cpu",
            "OPENBLAS_NUM_THREADS": "1",
            **{f"CBEC_{name.upper()}_GRPC_PORT": str(free_port()) for name in SERVICES},
        }
    )
    logs = work / "logs"
    launcher_log = (work / "launcher.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.runtime.launcher",
            "--no-prepare",  # the tiny models above instead of the default training
            "--models-dir",
            str(models),
            "--log-dir",
            str(logs),
            "--ready-timeout",
            "150",
            "--grace",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=launcher_log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            status, body = _get(f"{url}/readyz")
            if status == 200:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                tails = {p.name: p.read_text(errors="replace")[-1500:] for p in sorted(logs.glob("*.log"))}
                pytest.fail(
                    f"the suite did not become ready (launcher exit {proc.poll()}, /readyz {status} {body})\n"
                    + (work / "launcher.log").read_text(errors="replace")[-2000:]
                    + json.dumps(tails, indent=1)
                )
            time.sleep(0.5)
        write_shoe_jpg(work)
        yield url, work
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        launcher_log.close()


@pytest.mark.parametrize("readme", sorted(READMES))
def test_every_readme_example_gets_a_2xx(suite: tuple[str, Path], readme: str) -> None:
    url, work = suite
    setup, commands = readme_examples(readme)
    # The commands run exactly as written; curl prints the HTTP status after each answer. A stream
    # (converse) must not end in an {"error": ...} line either.
    wrapper = f"curl() {{ command curl -w '\\n{STATUS_MARK}%{{http_code}}\\n' \"$@\"; }}"
    failures = []
    for command in commands:
        script = f"set -e\n{setup}\nGW={url}\n{wrapper}\n{command}\n"
        done = subprocess.run(
            ["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=60, check=False
        )
        marks = re.findall(rf"^{STATUS_MARK}(\d+)$", done.stdout, re.M)
        status = int(marks[-1]) if marks else 0
        streamed_error = any(line.startswith('{"error"') for line in done.stdout.splitlines())
        if done.returncode != 0 or not 200 <= status < 300 or streamed_error:
            failures.append(f"{command}\n  -> exit {done.returncode}, HTTP {status}: {done.stdout[-600:]}")
    assert not failures, "README examples that fail:\n" + "\n".join(failures)
