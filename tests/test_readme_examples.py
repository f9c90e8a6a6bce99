"""Every curl example of the READMEs' HTTP/JSON sections (the project's and the gateway's), run as
written against ``make run``'s set-up.

The suite is ``make run``'s own launcher on the demo catalogue (``tests/demo_suite.py``: every service
and the gateway as processes, ``CBEC_GATEWAY_ENV=dev`` so the documented development key works), with small
real model versions instead of the default training, on free ports. Each
command is taken from the README's code block and run by bash as it stands; only ``$GW`` points at the
test's gateway. Every one must get a 2xx.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.demo_suite import DemoSuite

ROOT = Path(__file__).resolve().parents[1]
#: README -> the heading of the section whose first bash block holds its HTTP examples
READMES = {"README.md": "### Over HTTP/JSON", "gateway/README.md": "## Calling it"}
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


@pytest.fixture(scope="module")
def suite(demo_suite: DemoSuite, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The session's demo suite (``make run``'s launcher on the demo catalogue); yields (gateway URL,
    a work folder holding ``shoe.jpg``)."""
    work = tmp_path_factory.mktemp("readme")
    write_shoe_jpg(work)
    return demo_suite.url, work


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


EXCHANGE_MARK = "<!-- chat-exchange -->"


def chat_exchanges() -> list[tuple[str, dict[str, object]]]:
    """Each ``<!-- chat-exchange -->`` of the README: its curl command and the result it shows."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for part in text.split(EXCHANGE_MARK)[1:]:
        found = re.match(r"\s*```bash\n(.*?)```\s*```json\n(.*?)```", part, re.S)
        assert found is not None, "a chat exchange is a bash block followed by a json block"
        out.append((found.group(1).strip(), json.loads(found.group(2))))
    return out


def test_the_readme_shows_two_chat_exchanges_in_two_languages() -> None:
    exchanges = chat_exchanges()
    assert len(exchanges) == 2
    assert len({shown["result"]["result"]["language"] for _, shown in exchanges}) == 2  # type: ignore[index]


def test_the_readme_chat_exchanges_are_what_the_service_answers(suite: tuple[str, Path]) -> None:
    url, work = suite
    setup, _ = readme_examples("README.md")
    differ = []
    for command, shown in chat_exchanges():
        done = subprocess.run(
            ["bash", "-c", f"set -e\n{setup}\nGW={url}\n{command}\n"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        got = json.loads(done.stdout)["result"]["result"]  # the stream's last message: the result
        want = shown["result"]["result"]  # type: ignore[index]
        assert isinstance(want, dict)
        if {k: got.get(k) for k in want} != want:
            differ.append(f"{command}\n  shows {json.dumps(want, ensure_ascii=False)}\n  got {done.stdout}")
    assert not differ, "README chat exchanges that differ:\n" + "\n".join(differ)
