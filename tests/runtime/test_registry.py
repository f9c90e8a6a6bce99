"""The service registry (``services/runtime/registry.py``) and everything derived from it or checked
against it: the settings classes and their environment variables, the gateway's backends, the launcher,
the images and the Helm chart.

Which variables a settings class reads is measured, not taken from its declarations: pydantic-settings'
own environment source is given one candidate variable at a time and reports what it picked up."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import tomllib
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import EnvSettingsSource

from gateway.config import BACKENDS, GatewaySettings
from services.recommender.settings import RecommenderSettings
from services.runtime.config import (
    DEFAULT_PORTS,
    ConfigError,
    RuntimeSettings,
    env_var_name,
    load_settings,
)
from services.runtime.registry import SERVICES, callers, main, start_order
from tools import launcher

ROOT = Path(__file__).resolve().parents[2]
CLASSES: dict[str, type[RuntimeSettings]] = {name: s.settings_class() for name, s in SERVICES.items()}
SHARED_FIELDS = set(RuntimeSettings.model_fields)


def _clear_cbec(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.upper().startswith("CBEC_")]:
        monkeypatch.delenv(key)


def _candidates() -> set[str]:
    """Every variable any service declares, and CBEC_<FIELD> for every field (the unprefixed name a
    service field had before; a source that still reads it would collide again)."""
    names = {v for cls in CLASSES.values() for v in cls.env_names().values()}
    return names | {env_var_name(f) for cls in CLASSES.values() for f in cls.model_fields}


def _reads(cls: type[RuntimeSettings], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Variable -> the field it sets, for every candidate variable the class's env source reads."""
    aliases = {env: field for field, env in cls.prefixed_env.items()}
    found: dict[str, str] = {}
    for name in sorted(_candidates()):
        monkeypatch.setenv(name, "1")
        picked = EnvSettingsSource(cls)()
        monkeypatch.delenv(name)
        assert len(picked) <= 1, (cls.__name__, name, picked)
        for key in picked:
            found[name] = aliases.get(key, key)
    return found


@pytest.fixture(scope="module")
def reads() -> dict[str, dict[str, str]]:
    with pytest.MonkeyPatch.context() as mp:
        _clear_cbec(mp)
        return {name: _reads(cls, mp) for name, cls in CLASSES.items()}


# --- (a) no variable with two meanings ---------------------------------------------------------------


def test_no_variable_is_read_by_two_services_with_different_meanings(
    reads: dict[str, dict[str, str]],
) -> None:
    for a, b in combinations(SERVICES, 2):
        for name in set(reads[a]) & set(reads[b]):
            # shared: a field RuntimeSettings declares (same validation, same use), read under its name
            assert reads[a][name] == reads[b][name] in SHARED_FIELDS, (a, b, name)
            assert name == env_var_name(reads[a][name]), (a, b, name)
    # the collision the registry was made for
    assert "CBEC_MAX_K" not in reads["recommender"] and "CBEC_MAX_K" not in reads["gateway"]
    assert reads["recommender"]["CBEC_RECOMMENDER_MAX_K"] == reads["gateway"]["CBEC_GATEWAY_MAX_K"] == "max_k"


def test_a_service_reads_exactly_what_it_declares(reads: dict[str, dict[str, str]]) -> None:
    for name, cls in CLASSES.items():
        declared = {env: field for field, env in cls.env_names().items()}
        assert reads[name] == declared, name
        own = {env for field, env in cls.env_names().items() if field not in SHARED_FIELDS}
        assert all(env.startswith(SERVICES[name].env_prefix) for env in own), name
        # a field named <service>_... is not prefixed twice
        assert not any(env.startswith(f"{SERVICES[name].env_prefix}{name.upper()}_") for env in own), name
    assert CLASSES["risk"].env_names()["risk_reasons"] == "CBEC_RISK_REASONS"


def test_a_service_field_is_read_under_its_prefix_and_named_so_in_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clear_cbec(monkeypatch)
    monkeypatch.setenv("CBEC_RECOMMENDER_MAX_K", "10000")
    monkeypatch.setenv("CBEC_GATEWAY_ENV", "dev")
    assert load_settings(RecommenderSettings, "recommender").max_k == 10_000
    assert load_settings(GatewaySettings, "gateway").max_k == 100  # the recommender's is not the gateway's
    monkeypatch.setenv("CBEC_GATEWAY_MAX_K", "10000")
    with pytest.raises(ConfigError):
        load_settings(GatewaySettings, "gateway")
    assert "CBEC_GATEWAY_MAX_K='10000': Input should be less than or equal to 500" in capsys.readouterr().err
    # code and tests pass field names; the error still names the variable
    with pytest.raises(ConfigError):
        load_settings(RecommenderSettings, "recommender", max_k=0)
    assert "CBEC_RECOMMENDER_MAX_K=0:" in capsys.readouterr().err
    assert RecommenderSettings(max_k=7).max_k == 7
    with pytest.raises(TypeError, match="service"):  # an own field needs a service to prefix it with

        class _Nameless(RuntimeSettings):
            colour: str = "red"


# --- (b) settings only through the typed classes -------------------------------------------------------

SCANNED = ("services", "gateway", "demo", "tools")
#: Files that may read a CBEC_ variable from os.environ themselves, and why.
ALLOWED = {
    # cbecctl runs on an operator's machine, not in a service: its variables configure the client.
    "tools/cbecctl/cli.py": "client-side defaults (CBEC_NAMESPACE, the gateway's CA file for the client)",
    "tools/cbecctl/helm.py": "client-side default chart reference (CBEC_HELM_CHART)",
}


def _constants(trees: list[ast.Module]) -> dict[str, str]:
    """Module-level string constants by name (NAME = "CBEC_..."), across the scanned files."""
    out = {}
    for tree in trees:
        for node in tree.body:
            value = node.value if isinstance(node, ast.Assign) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                out.update({t.id: value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def _key(node: ast.AST | None, constants: dict[str, str]) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    if isinstance(node, ast.Name):
        return constants.get(node.id, "")
    if isinstance(node, ast.Attribute):
        return constants.get(node.attr, "")
    return ""


def _is_environ(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", "") == "os"
    )


def _environ_reads(tree: ast.Module, constants: dict[str, str]) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        key: ast.AST | None = None
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            func = node.func
            if (_is_environ(func.value) and func.attr in ("get", "pop", "setdefault")) or (
                func.attr == "getenv" and getattr(func.value, "id", "") == "os"
            ):
                key = node.args[0]
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            key = node.left
        name = _key(key, constants) if key is not None else ""
        if name.upper().startswith("CBEC_"):
            found.append((node.lineno, name))
    return found


def _settings_modules() -> set[str]:
    modules = {"services/runtime/config.py"}
    for cls in CLASSES.values():
        modules.add(cls.__module__.replace(".", "/") + ".py")
    return modules


def test_no_code_reads_a_cbec_variable_outside_the_settings_classes() -> None:
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    trees = {p.relative_to(ROOT).as_posix(): ast.parse(p.read_text(), str(p)) for p in files}
    constants = _constants(list(trees.values()))
    allowed = _settings_modules() | set(ALLOWED)
    offenders = {
        path: reads
        for path, tree in trees.items()
        if path not in allowed and (reads := _environ_reads(tree, constants))
    }
    assert not offenders, f"read CBEC_* through the service's settings class instead: {offenders}"
    # the scan finds what it looks for (the allowed files do read their variables)
    assert _environ_reads(trees["tools/cbecctl/cli.py"], constants)
    probe = ast.parse(
        'import os\nX = "CBEC_A"\nos.environ.get(X); os.getenv(f"CBEC_{1}"); "CBEC_B" in os.environ'
    )
    assert [n for _, n in _environ_reads(probe, _constants([probe]))] == ["CBEC_A", "CBEC_", "CBEC_B"]


def test_command_line_tools_take_their_defaults_from_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.recommender import train as recommender_train
    from services.risk.credit import modeldata_dir
    from services.sentiment import train as sentiment_train

    _clear_cbec(monkeypatch)
    models, cache = tmp_path / "models", tmp_path / "cache"
    assert sentiment_train.default_cache_dir(models) == models / ".cache" / "sentiment"
    monkeypatch.setenv("CBEC_SENTIMENT_CACHE_DIR", str(cache))
    monkeypatch.setenv("CBEC_MODELS_DIR", str(models))
    monkeypatch.setenv("CBEC_DEVICE", "cpu")
    assert sentiment_train.default_cache_dir(models) == cache
    assert sentiment_train.configured_settings().models_dir == models
    settings = recommender_train.configured_settings()
    assert (settings.models_dir, settings.device) == (models, "cpu")
    (tmp_path / "rdata" / "Rdata.rdb").parent.mkdir()
    (tmp_path / "rdata" / "Rdata.rdb").write_bytes(b"")
    monkeypatch.setenv("CBEC_RISK_MODELDATA_DIR", str(tmp_path / "rdata"))
    assert modeldata_dir() == tmp_path / "rdata"


def test_client_tool_variables_are_no_service_setting(reads: dict[str, dict[str, str]]) -> None:
    """cbecctl's own variables (some under CBEC_GATEWAY_) must not be something a service reads."""
    from tools.cbecctl import admin, helm

    client = {admin.API_KEY_ENV, admin.GATEWAY_ENV, admin.GATEWAY_CA_ENV, helm.CHART_ENV, "CBEC_NAMESPACE"}
    every = {name for r in reads.values() for name in r}
    assert not client & every
    for name in client:
        for cls in CLASSES.values():
            assert name not in cls.env_names().values()


# --- (c) the registry, the settings, the gateway, the launcher, the images and the chart agree -------


def test_settings_classes_follow_the_registry() -> None:
    assert {n: (s.grpc_port, s.metrics_port) for n, s in SERVICES.items()} == DEFAULT_PORTS
    for name, s in SERVICES.items():
        cls = CLASSES[name]
        assert issubclass(cls, RuntimeSettings) and cls.model_fields["service"].default == name
        addr_fields = {f for f in cls.model_fields if f.endswith("_addr")}
        assert addr_fields == {f"{up}_addr" for up in s.calls}, name
        settings = cls.model_construct()
        for up in s.calls:
            assert cls.model_fields[f"{up}_addr"].default == f"127.0.0.1:{SERVICES[up].grpc_port}"
            assert cls.env_names()[f"{up}_addr"] == s.address_env(up)
            assert settings.upstream_address(up) == f"127.0.0.1:{SERVICES[up].grpc_port}"
        main_py = ROOT / s.code_dir / "__main__.py"
        assert f'main("{name}", ' in main_py.read_text() and cls.__name__ in main_py.read_text()
    assert SERVICES["gateway"].calls == BACKENDS
    assert callers("sentiment") == ("gateway", "chat")


def test_the_gateway_reads_its_backend_addresses_from_its_own_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_cbec(monkeypatch)
    monkeypatch.setenv("CBEC_GATEWAY_ENV", "dev")
    monkeypatch.setenv("CBEC_GATEWAY_RISK_ADDR", "dns:///risk:1")
    monkeypatch.setenv("CBEC_CHAT_SENTIMENT_ADDR", "chat-only:2")  # chat's, not the gateway's
    monkeypatch.setenv("CBEC_GATEWAY_TRANSLATE_ADDR", "translate:3")  # a backend the registry lacks
    settings = load_settings(GatewaySettings, "gateway")
    assert settings.backend_address("risk") == "dns:///risk:1"
    assert settings.backend_address("sentiment") == "127.0.0.1:50053"
    assert settings.backend_address("translate") == "translate:3"
    assert settings.backend_address("nowhere") is None


def test_the_launcher_starts_the_registry(tmp_path: Path) -> None:
    specs = launcher.discover({"chat": 41001})
    assert [s.name for s in specs] == start_order()  # every service has code
    assert start_order().index("sentiment") < start_order().index("chat") < start_order().index("gateway")
    env = launcher.environment({"CBEC_STATE_DIR": str(tmp_path)}, tmp_path / "models", 1.0)
    for spec in specs:
        s = spec.service
        child = launcher.service_environment(spec, specs, env, 18080, None)
        own = set(child) - set(env)
        wanted = {"CBEC_GRPC_PORT", "CBEC_METRICS_PORT"} | {s.address_env(up) for up in s.calls}
        if s.http_port:
            wanted.add(f"{s.env_prefix}HTTP_PORT")
        assert own == wanted, spec.name
        assert child["CBEC_GRPC_PORT"] == str(41001 if s.name == "chat" else s.grpc_port)
        assert child["CBEC_METRICS_PORT"] == str(s.metrics_port)
        for up in s.calls:
            port = 41001 if up == "chat" else SERVICES[up].grpc_port
            assert child[s.address_env(up)] == f"127.0.0.1:{port}"
    assert env["CBEC_GATEWAY_ENV"] == "dev"
    with pytest.raises(ValueError, match="translate"):
        launcher.discover({"translate": 1})


def test_the_registry_answers_shell_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["names"]) == 0
    assert capsys.readouterr().out.split() == list(SERVICES)
    assert main(["show", "vision"]) == 0
    shown = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert shown["extras"] == "vision,cpu" and shown["gpu_extras"] == "vision,gpu"
    assert shown["code_dir"] == "services/vision" and shown["module"] == "services.vision"
    assert main(["show", "translate"]) == 2


def test_images_follow_the_registry() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    images = ROOT / "deploy" / "images"
    for name, s in SERVICES.items():
        for file, wanted in (("Containerfile", s.extras), ("Containerfile.gpu", s.gpu_extras)):
            path = images / name / file
            assert path.exists() == (wanted is not None), path
            if wanted is None:
                continue
            text = path.read_text()
            [installed] = re.findall(r'pip install -c constraints\.txt "\.\[([\w,]+)\]"', text)
            assert tuple(installed.split(",")) == wanted and set(wanted) <= set(extras), path
            assert re.search(rf"^EXPOSE {s.grpc_port} {s.metrics_port}\b", text, re.M), path
            assert text.rstrip().endswith(f'ENTRYPOINT ["python", "-m", "{s.entry_module}"]'), path
            assert f"COPY {s.code_dir} {s.code_dir}" in text, path
    # build.sh takes its service list from the registry
    result = subprocess.run(
        ["bash", str(images / "build.sh"), "--dry-run", "--cpu-only"],
        capture_output=True,
        text=True,
        env={**os.environ, "CBEC_IMAGE_BUILDER": "docker"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    built = re.findall(r"/cbec-([a-z]+):", result.stdout)
    assert built == list(SERVICES)


# --- the Helm chart -----------------------------------------------------------------------------------


def _values_blocks() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((ROOT / "deploy" / "helm" / "cbec" / "values.yaml").read_text())["services"]


def test_the_charts_service_blocks_follow_the_registry() -> None:
    blocks = _values_blocks()
    assert set(blocks) == set(SERVICES)
    for name, s in SERVICES.items():
        b = blocks[name]
        assert (b["grpcPort"], b["metricsPort"], b.get("httpPort")) == (
            s.grpc_port,
            s.metrics_port,
            s.http_port,
        )
        assert (b.get("module") or f"services.{name}") == s.entry_module
        assert b.get("gpuImage", False) == (s.gpu_extras is not None)
        calls = b.get("calls", [])
        expanded = [n for n in SERVICES if n != name] if calls == ["*"] else calls
        assert sorted(expanded) == sorted(s.calls), name


@pytest.fixture(scope="module")
def chart() -> Any:
    from tests.deploy.conftest import helm_template

    return helm_template()


def _labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "cbec",
        "app.kubernetes.io/instance": "shop",
        "app.kubernetes.io/component": name,
    }


def test_the_rendered_chart_wires_the_registry(chart: Any) -> None:
    for name, s in SERVICES.items():
        [container] = chart.deployment(name)["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        wanted = {"grpc": s.grpc_port, "metrics": s.metrics_port} | (
            {"http": s.http_port} if s.http_port else {}
        )
        assert ports == wanted, name
        assert container["command"] == ["python", "-m", s.entry_module]
        env = {e["name"]: e.get("value") for e in container["env"]}
        addresses = {k for k in env if k.endswith("_ADDR")}
        assert addresses == {s.address_env(up) for up in s.calls}, name
        for up in s.calls:
            host = f"shop-cbec-{up}.cbec.svc.cluster.local"
            assert env[s.address_env(up)] == f"dns:///{host}:{SERVICES[up].grpc_port}"
        # every variable the chart sets for it is one its settings read (or not a CBEC_ one)
        known = set(CLASSES[name].env_names().values())
        assert {k for k in env if k.startswith("CBEC_")} <= known, (name, {k for k in env} - known)

        policy = chart.get("NetworkPolicy", f"shop-cbec-{name}")["spec"]
        egress_to = {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: rule["ports"]
            for rule in policy["egress"]
            for peer in rule.get("to", [])
            if "podSelector" in peer
            and peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component") in SERVICES
        }
        assert egress_to == {up: [{"port": SERVICES[up].grpc_port, "protocol": "TCP"}] for up in s.calls}, (
            name
        )
        if name != "gateway":  # the gateway's ingress is its public API (gatewayFrom)
            [grpc_rule] = [
                r for r in policy["ingress"] if r["ports"] == [{"port": "grpc", "protocol": "TCP"}]
            ]
            assert grpc_rule["from"] == [
                {"podSelector": {"matchLabels": _labels(c)}} for c in sorted(callers(name))
            ]


def test_the_chart_refuses_a_setting_in_another_services_block() -> None:
    from tests.deploy.conftest import RenderError, helm_template

    with pytest.raises(RenderError, match="only gateway reads CBEC_GATEWAY_"):
        helm_template({"services": {"recommender": {"env": {"CBEC_GATEWAY_MAX_K": "10"}}}})
    with pytest.raises(RenderError, match=r"services\.chat\.calls names sentimnet"):
        helm_template({"services": {"chat": {"calls": ["sentimnet"]}}})
    ok = helm_template({"services": {"recommender": {"env": {"CBEC_RECOMMENDER_MAX_K": "1000"}}}})
    [container] = ok.deployment("recommender")["spec"]["template"]["spec"]["containers"]
    assert {"name": "CBEC_RECOMMENDER_MAX_K", "value": "1000"} in container["env"]


def test_a_variable_under_its_name_from_before_the_prefixes_is_reported_not_silently_ignored(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.recommender.settings import RecommenderSettings
    from services.runtime.config import load_settings

    monkeypatch.setenv("CBEC_MAX_K", "7")  # the recommender's max_k before it carried its prefix
    monkeypatch.setenv("CBEC_RISK_REASONS", "2")  # risk's own, read as it stands: not an old name
    settings = load_settings(RecommenderSettings, "recommender")
    assert settings.max_k != 7
    err = capsys.readouterr().err
    assert "CBEC_MAX_K is not read any more: use CBEC_RECOMMENDER_MAX_K" in err
    assert "CBEC_RISK_REASONS" not in err
