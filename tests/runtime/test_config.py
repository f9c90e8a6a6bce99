from __future__ import annotations

import pytest

from services.runtime.config import ConfigError, RuntimeSettings, load_settings


def test_defaults_follow_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBEC_GRPC_PORT", raising=False)
    risk = load_settings(RuntimeSettings, "risk")
    assert (risk.grpc_port, risk.metrics_port) == (50055, 9105)
    gateway = load_settings(RuntimeSettings, "gateway")
    assert (gateway.grpc_port, gateway.metrics_port) == (50050, 9100)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBEC_GRPC_PORT", "6000")
    monkeypatch.setenv("CBEC_DEVICE", "CUDA:1")
    s = load_settings(RuntimeSettings, "risk")
    assert s.grpc_port == 6000 and s.metrics_port == 9105
    assert s.device == "cuda:1"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CBEC_GRPC_PORT", "70000"),
        ("CBEC_LOG_LEVEL", "LOUD"),
        ("CBEC_BATCH_MAX_SIZE", "-1"),
        ("CBEC_DEVICE", "gpu"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings(RuntimeSettings, "risk")
    assert err.value.code == 2
    assert f"{variable}={value!r}" in capsys.readouterr().err
