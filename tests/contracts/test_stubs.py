"""The cbec-ai-protos wheel as another team gets it: built by ``make stubs``, installed with pip into a
clean virtualenv (no system site packages, not this checkout's gen/), and the README's Python example
run with it, as it stands, against risk in ``make run``'s suite (tests/demo_suite.py); only the
address is the suite's (and var/internal-token, which the example reads, is the suite's token).

The end-to-end test is slow-ish (a virtualenv, pip resolving grpcio and protobuf, from its cache when it
has them) and runs in every ``make test``.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.demo_suite import DemoSuite

ROOT = Path(__file__).resolve().parents[2]
README_SECTION = "### With a generated stub (gRPC)"
README_ADDRESS = "127.0.0.1:50055"  # the address in the README's example: risk under `make run`
DISTRIBUTION = "cbec-ai-protos"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make stubs``, into a temporary folder instead of dist/."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        ["make", "--no-print-directory", "stubs", f"STUBS_DIST={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(out.glob("cbec_ai_protos-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_the_wheel_holds_every_generated_module_at_the_protos_version(wheel: Path) -> None:
    meta = metadata(wheel)
    assert meta["Name"] == DISTRIBUTION
    assert meta["Version"] == (ROOT / "protos" / "VERSION").read_text().strip()
    generated = {
        p.relative_to(ROOT / "gen").as_posix()
        for p in (ROOT / "gen" / "cbec").rglob("*")
        if p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts
    }
    assert any(name.endswith("_pb2_grpc.py") for name in generated)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert generated <= names, sorted(generated - names)
    assert "cbec/py.typed" in names
    packages = {str(Path(name).parent) for name in generated}
    assert {f"{package}/__init__.py" for package in packages} <= names


def test_the_wheels_dependencies_admit_the_pins_and_the_generated_code() -> None:
    """Its ranges hold the versions this project installs (pyproject.toml's pins, or what its range
    installed here) and start where the generated code starts to import: grpcio at the grpcio-tools
    that generated it, protobuf at its gencode."""
    declared = tomllib.loads((ROOT / "protos" / "python" / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: Requirement(r).specifier for r in declared["dependencies"]}
    assert set(ranges) == {"grpcio", "protobuf", "googleapis-common-protos"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in map(Requirement, project):
        if requirement.name in ranges:
            pins = [s.version for s in requirement.specifier if s.operator == "=="]
            used = pins[0] if pins else importlib.metadata.version(requirement.name)
            assert used in requirement.specifier and used in ranges[requirement.name], (
                f"{requirement.name} {used}: the project's {requirement.specifier}, the wheel's "
                f"{ranges[requirement.name]}"
            )
    grpc_code = next((ROOT / "gen" / "cbec").rglob("*_pb2_grpc.py")).read_text()
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_code)
    pb2_code = next((ROOT / "gen" / "cbec").rglob("*_pb2.py")).read_text()
    gencode = re.search(r"# Protobuf Python Version: (\S+)", pb2_code)
    assert grpc_generated and gencode
    for name, floor in (("grpcio", grpc_generated.group(1)), ("protobuf", gencode.group(1))):
        lower = [s.version for s in ranges[name] if s.operator == ">="]
        assert lower == [floor], f"{name}{ranges[name]}: the generated code needs >={floor}"
    major = Version(gencode.group(1)).major
    assert Version(f"{major + 1}.0") not in ranges["protobuf"], "protobuf gencode refuses another major"


def readme_example() -> str:
    """The ```python block of the README's generated-stub section, as it stands."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(README_SECTION) :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, f"README.md: {README_SECTION!r} has no python block"
    assert block.group(1).count(README_ADDRESS) == 1, "the example no longer calls risk at 127.0.0.1:50055"
    return block.group(1)


@pytest.mark.timeout(600)  # the suite's start (shared with the other suite tests) plus a pip install
def test_the_readme_example_runs_with_the_wheel_in_a_clean_virtualenv(
    wheel: Path, demo_suite: DemoSuite, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # The stubs come from the wheel, not from this checkout (whose virtualenv adds gen/ to its path).
    where = subprocess.run(
        [str(python), "-c", "import cbec.risk.v1.risk_pb2 as m, sys; print(m.__file__); print(sys.path)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert where.startswith(str(venv / "lib")) and str(ROOT) not in where, where

    example = readme_example().replace(README_ADDRESS, f"127.0.0.1:{demo_suite.grpc_ports['risk']}")
    (tmp_path / "example.py").write_text(example)
    # It runs from the repository's folder, where `make run` keeps its internal token in var/; the
    # suite's is in its state folder.
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "internal-token").symlink_to(demo_suite.work / "state" / "internal-token")
    done = subprocess.run(
        [str(python), "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{done.stderr}\n{demo_suite.logs()[-3000:]}"
    # It prints the decision (an enum number), the fraud probability and the first reasons.
    decision, probability, *_ = done.stdout.split(maxsplit=2)
    assert int(decision) in {1, 2, 3}, done.stdout  # APPROVE, REVIEW, DECLINE
    assert 0.0 <= float(probability) <= 1.0, done.stdout
