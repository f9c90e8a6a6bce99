"""The contract's tooling: ``buf lint`` and ``buf breaking`` as ``make lint`` runs them, the released
contract they compare against, and ``buf generate`` with buf.gen.yaml's local plugins.

The released contracts are buf images (``protos/released/cbec-<version>.binpb``, committed, so a clean
clone checks without network). A buf image is wire-compatible with ``FileDescriptorSet``, so the
tests read them with protobuf itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".venv" / "bin" / "buf"
RELEASED = ROOT / "protos" / "released"
TOOLS_BIN = ROOT / "build" / "tools" / "bin"  # buf.gen.yaml names the plugins there
IMAGE_NAME = re.compile(r"cbec-(\d+\.\d+\.\d+)\.binpb")
UNKNOWN = descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def releases() -> dict[Version, Path]:
    """Every released contract by version; the names are the whole folder."""
    found = {}
    for path in RELEASED.iterdir():
        match = IMAGE_NAME.fullmatch(path.name)
        assert match, f"protos/released/{path.name}: not a cbec-<major.minor.patch>.binpb image"
        found[Version(match.group(1))] = path
    assert found, "no released contract in protos/released"
    return found


def newest_release() -> tuple[Version, Path]:
    version = max(releases())
    return version, releases()[version]


def protos_version() -> Version:
    return Version((ROOT / "protos" / "VERSION").read_text().strip())


def read_image(path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The cbec files of a buf image (its googleapis and well-known imports left out), by name."""
    image = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    files = {}
    for file in image.file:
        if file.name.startswith("cbec/"):
            file.DiscardUnknownFields()  # buf's own per-file metadata (import flags, module name)
            files[file.name] = file
    return files


@pytest.fixture(scope="module")
def current_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The protos of the working tree, built the way ``make release-protos`` builds a release."""
    out = tmp_path_factory.mktemp("image") / "current.binpb"
    done = buf("build", "protos", "--exclude-source-info", "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_make_lint_runs_buf_lint_and_buf_breaking_against_the_newest_release() -> None:
    _, image = newest_release()
    plan = subprocess.run(
        ["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert f"{BUF.relative_to(ROOT)} lint" in plan
    command = f"buf breaking protos --against {image.relative_to(ROOT)}"
    assert command in plan, plan
    # ... and both pass on the protos as they are.
    for args in (["lint"], ["breaking", "protos", "--against", str(image.relative_to(ROOT))]):
        done = buf(*args)
        assert done.returncode == 0, f"buf {' '.join(args)}:\n{done.stdout}{done.stderr}"


def copy_workspace(dest: Path) -> Path:
    """buf's workspace (buf.yaml, protos, build/protodeps) in ``dest``, to change without touching ours."""
    shutil.copy(ROOT / "buf.yaml", dest / "buf.yaml")
    shutil.copytree(ROOT / "protos", dest / "protos", ignore=shutil.ignore_patterns("python", "released"))
    shutil.copytree(ROOT / "build" / "protodeps", dest / "build" / "protodeps")
    return dest


def test_buf_breaking_fails_on_a_breaking_change_and_passes_an_addition(tmp_path: Path) -> None:
    _, image = newest_release()
    work = copy_workspace(tmp_path)
    risk = work / "protos" / "cbec" / "risk" / "v1" / "risk.proto"
    original = risk.read_text()
    # A released field renamed: source-incompatible for every generated client.
    renamed, count = re.subn(r"\bstring user_id = 2\b", "string buyer_id = 2", original)
    assert count == 1
    risk.write_text(renamed)
    done = buf("breaking", "protos", "--against", str(image), cwd=work)
    assert done.returncode != 0 and 'changed name from "user_id" to "buyer_id"' in done.stdout, done.stdout
    # A new message is an addition, which a release may carry.
    risk.write_text(original + "\nmessage AddedInTheTest {\n  string note = 1;\n}\n")
    done = buf("breaking", "protos", "--against", str(image), cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr


def changed_idempotency(
    released: dict[str, descriptor_pb2.FileDescriptorProto],
    current: dict[str, descriptor_pb2.FileDescriptorProto],
) -> list[str]:
    """RPCs whose released idempotency_level is not the current one. buf.yaml leaves buf's rule
    (RPC_SAME_IDEMPOTENCY_LEVEL) out because it also forbids declaring a level where none was; this is
    the rest of it. A removed RPC is buf breaking's to report."""
    now = {
        f"{file.package}.{service.name}/{method.name}": method.options.idempotency_level
        for file in current.values()
        for service in file.service
        for method in service.method
    }
    changed = []
    for file in released.values():
        for service in file.service:
            for method in service.method:
                name = f"{file.package}.{service.name}/{method.name}"
                level = method.options.idempotency_level
                if level != UNKNOWN and name in now and now[name] != level:
                    changed.append(name)
    return changed


def test_a_released_idempotency_level_never_changes(current_image: Path) -> None:
    current = read_image(current_image)
    for version, image in sorted(releases().items()):
        assert changed_idempotency(read_image(image), current) == [], f"against cbec {version}"
    # The check itself: a declared level changed is reported, a first declaration is not.
    declared = [
        (file.name, s, m)
        for file in current.values()
        for s, service in enumerate(file.service)
        for m, method in enumerate(service.method)
        if method.options.idempotency_level != UNKNOWN
    ]
    assert declared, "the contract declares idempotency levels (protos/**: idempotency_level)"
    name, s, m = declared[0]
    edited = {
        k: descriptor_pb2.FileDescriptorProto.FromString(v.SerializeToString()) for k, v in current.items()
    }
    options = edited[name].service[s].method[m].options
    options.idempotency_level = (
        descriptor_pb2.MethodOptions.IDEMPOTENT
        if options.idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
        else descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    )
    method = current[name].service[s].method[m]
    assert changed_idempotency(current, edited) == [
        f"{current[name].package}.{current[name].service[s].name}/{method.name}"
    ]
    options.ClearField("idempotency_level")
    assert changed_idempotency(edited, current) == []


def test_the_version_moves_with_the_protos(current_image: Path) -> None:
    """protos/VERSION is never behind the newest release, and once the protos differ from that release
    it is ahead of it: a wheel's version never names two different contracts."""
    version, image = newest_release()
    assert protos_version() >= version, f"protos/VERSION {protos_version()} is behind released {version}"
    if read_image(image) != read_image(current_image):
        assert protos_version() > version, (
            f"the protos changed since release {version}: raise protos/VERSION (docs/stubs.md)"
        )


# --- buf generate ---


@pytest.fixture(scope="module")
def plugins() -> Path:
    """buf.gen.yaml's plugins, installed by their script on first use (a failure fails the test)."""
    env = {k: v for k, v in os.environ.items() if k != "CBEC_TOOLS_DIR"}
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "install-protoc-plugins.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return TOOLS_BIN


@pytest.fixture(scope="module")
def generated(plugins: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``buf generate`` with buf.gen.yaml as it is, into a temporary folder (-o)."""
    out = tmp_path_factory.mktemp("buf-generate")
    done = buf("generate", "-o", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "gen"


def services(image: Path) -> list[tuple[str, str, str]]:
    """(proto file without .proto, proto package, service name) of every service."""
    return [
        (file.name.removesuffix(".proto"), file.package, service.name)
        for file in read_image(image).values()
        for service in file.service
    ]


def test_buf_generate_writes_python_go_and_typescript_for_every_service(
    generated: Path, current_image: Path
) -> None:
    found = services(current_image)
    assert len(found) >= 6
    for stem, package, service in found:
        go_package = "".join(package.split(".")[-2:])  # cbec.risk.v1 -> riskv1 (managed mode's name)
        expected = {
            f"python/{stem}_pb2.py": f"_globals['_{service.upper()}']",
            f"python/{stem}_pb2.pyi": "class ",
            f"python/{stem}_pb2_grpc.py": f"class {service}Stub",
            f"go/{stem}.pb.go": f"package {go_package}\n",
            f"go/{stem}_grpc.pb.go": f"func New{service}Client(cc grpc.ClientConnInterface) {service}Client",
            f"ts/{stem}_pb.ts": f"export const {service}: GenService<",
        }
        for relative, marker in expected.items():
            path = generated / relative
            assert path.is_file(), f"buf generate wrote no {relative}"
            assert marker in path.read_text(), f"{relative} lacks {marker!r}"
        go_server = (generated / f"go/{stem}_grpc.pb.go").read_text()
        # Debian 12's protoc-gen-go-grpc takes a *grpc.Server, newer ones a grpc.ServiceRegistrar.
        assert re.search(rf"func Register{service}Server\(s \*?grpc\.\w+, srv {service}Server\)", go_server)


def test_the_generated_python_imports_and_serializes(generated: Path) -> None:
    """The Python of buf generate, imported ahead of gen/ (this virtualenv's .pth), is the code of the
    same compiler as ``make protos``: its messages serialize as ours do."""
    from cbec.risk.v1 import risk_pb2

    script = (
        "import sys; from cbec.risk.v1 import risk_pb2, risk_pb2_grpc\n"
        "assert risk_pb2.__file__.startswith(sys.argv[1]), risk_pb2.__file__\n"
        "assert risk_pb2_grpc.RiskServiceStub\n"
        "print(risk_pb2.Transaction(transaction_id='t-1', user_id='u-42').SerializeToString().hex())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(generated / "python")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(generated / "python")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == risk_pb2.Transaction(transaction_id="t-1", user_id="u-42").SerializeToString().hex()
    )


def test_the_generated_typescript_type_checks_and_serializes_like_python(generated: Path) -> None:
    """tsc (strict) over every generated .ts, compiled to CommonJS and run with node against
    @bufbuild/protobuf: a message serializes to the same bytes as Python's."""
    from cbec.risk.v1 import risk_pb2

    modules = TOOLS_BIN.parent / "protoc-gen-es" / "node_modules"
    ts = generated / "ts"
    (ts / "node_modules").symlink_to(modules)
    sources = sorted(str(p.relative_to(ts)) for p in ts.rglob("*.ts") if "node_modules" not in p.parts)
    compile_ = [
        str(modules / ".bin" / "tsc"),
        *("--strict", "--noEmitOnError", "--skipLibCheck", "--target", "es2020"),
        *("--module", "commonjs", "--moduleResolution", "node10", "--outDir", "js"),
        *sources,
    ]
    done = subprocess.run(compile_, cwd=ts, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    script = (
        "const { create, toBinary } = require('@bufbuild/protobuf');\n"
        "const { TransactionSchema } = require('./js/cbec/risk/v1/risk_pb.js');\n"
        "const tx = create(TransactionSchema, { transactionId: 't-1', userId: 'u-42' });\n"
        "process.stdout.write(Buffer.from(toBinary(TransactionSchema, tx)).toString('hex'));\n"
    )
    done = subprocess.run(
        ["node", "-e", script], cwd=ts, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == risk_pb2.Transaction(transaction_id="t-1", user_id="u-42").SerializeToString().hex()
