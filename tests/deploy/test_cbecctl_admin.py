"""cbecctl's model-admin client and its help, without a cluster (the roll-outs themselves are in
test_cbecctl.py, against the Kubernetes emulator and an HTTP server playing the gateway)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.cbecctl import admin
from tools.cbecctl.cli import parser
from tools.cbecctl.errors import CbecctlError


def test_the_key_is_read_from_the_file_before_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  file-key\n")
    assert admin.read_api_key(str(key_file), {admin.API_KEY_ENV: "env-key"}) == "file-key"
    assert admin.read_api_key(None, {admin.API_KEY_ENV: " env-key "}) == "env-key"
    with pytest.raises(CbecctlError, match="pass --api-key-file PATH or set CBEC_ADMIN_API_KEY"):
        admin.read_api_key(None, {})
    key_file.write_text("\n")
    with pytest.raises(CbecctlError, match="is empty"):
        admin.read_api_key(str(key_file), {})
    key_file.write_text("alpha-key\nbeta-key\n")
    with pytest.raises(CbecctlError, match="more than one line") as info:
        admin.read_api_key(str(key_file), {})
    assert "alpha" not in str(info.value) and "beta" not in str(info.value)


def test_the_gateway_url_is_checked_and_the_client_never_shows_the_key() -> None:
    assert admin.gateway_url(None, {admin.GATEWAY_ENV: "http://gw:8080/"}) == "http://gw:8080"
    with pytest.raises(CbecctlError, match="pass --gateway URL"):
        admin.gateway_url(None, {})
    with pytest.raises(CbecctlError, match="must be an http:// or https:// URL"):
        admin.gateway_url("gw:8080", {})
    client = admin.AdminApi("https://gw.example", "secret-key")
    assert repr(client) == "AdminApi('https://gw.example')"


def test_which_failures_certainly_changed_nothing() -> None:
    assert admin.AdminApiError("refused", 400).nothing_changed
    assert admin.AdminApiError("no scope", 403).nothing_changed
    assert not admin.AdminApiError("pin not recorded", 503).nothing_changed
    assert not admin.AdminApiError("no answer").nothing_changed  # the switch may have happened


def test_help_says_which_way_to_change_a_model_when() -> None:
    text = parser().format_help()
    assert "rollout-model  the model-admin API through the gateway: fast (no pod restarts)" in text
    assert (
        "pin-model      prints the `helm upgrade --reuse-values --set services.<svc>.modelVersion=...`"
        in text
    )
    assert "`scale` changes replicas (or the autoscaler's bounds) at once and prints the values" in text
