"""The model-fetch init container: its script, as rendered into the Deployment, run with rclone against
a local "object store" (rclone's :local: backend), must lay out the model store the services read."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from services.runtime.model_store import ModelStore
from tests.deploy.conftest import helm_template, tool


def init_container(bucket: Path, pinned: str = "") -> dict[str, object]:
    values = {
        "models": {"source": "objectStore", "objectStore": {"url": f":local:{bucket}"}},
        "services": {"vision": {"modelVersion": pinned}},
    }
    pod = helm_template(values).deployment("vision")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    return init


def run_init(init: dict[str, object], models: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run the init container's command as the kubelet would, with /models and /tmp mapped to folders."""
    env = {e["name"]: e["value"] for e in init["env"]}  # type: ignore[index, union-attr]
    env["CBEC_MODELS_DIR"] = str(models)
    env["HOME"] = str(tmp)
    env["RCLONE_CONFIG"] = str(tmp / "rclone.conf")
    env["PATH"] = f"{tool('rclone').parent}:{os.environ['PATH']}"
    command = [*init["command"], *init["args"]]  # type: ignore[misc]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def publish(bucket: Path, versions: int) -> list[str]:
    """Versions of 'vision' in the object store, oldest first, written by the real model store."""
    made = []
    for i in range(versions):
        with ModelStore(bucket, "vision").new_version(metrics={"i": i}) as (path, manifest):
            (path / "weights.json").write_text(json.dumps({"factor": float(i + 1)}))
        made.append(manifest.version)
    return made


def test_fetches_the_newest_version_with_a_manifest(tmp_path: Path) -> None:
    bucket, models = tmp_path / "bucket", tmp_path / "models"
    versions = publish(bucket, 2)
    # a newer upload that never finished: no manifest, must be skipped
    (bucket / "vision" / "29991231T235959000000Z").mkdir()
    (bucket / "vision" / "29991231T235959000000Z" / "weights.json").write_text("{}")
    result = run_init(init_container(bucket), models, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipping 29991231T235959000000Z" in result.stderr
    store = ModelStore(models, "vision")
    assert [e.version for e in store.versions()] == [versions[-1]]
    newest = store.newest_valid()
    assert newest is not None and newest.manifest is not None and newest.manifest.service == "vision"
    assert json.loads((newest.path / "weights.json").read_text())["factor"] == 2.0
    assert not [p for p in (models / "vision").iterdir() if p.name.startswith(".")]
    # an init container restart finds the version in place and exits quickly
    again = run_init(init_container(bucket), models, tmp_path)
    assert again.returncode == 0 and "already present" in again.stdout


def test_fetches_a_pinned_version(tmp_path: Path) -> None:
    bucket, models = tmp_path / "bucket", tmp_path / "models"
    versions = publish(bucket, 3)
    result = run_init(init_container(bucket, pinned=versions[0]), models, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [e.version for e in ModelStore(models, "vision").versions() if e.valid] == [versions[0]]


@pytest.mark.parametrize("pinned", ["", "20200101T000000000000Z"])
def test_a_missing_model_fails_the_pod_start_clearly(tmp_path: Path, pinned: str) -> None:
    bucket = tmp_path / "bucket"
    (bucket / "vision").mkdir(parents=True)
    result = run_init(init_container(bucket, pinned=pinned), tmp_path / "models", tmp_path)
    assert result.returncode != 0
    expected = (
        f"pinned model version {pinned} not found" if pinned else "no model version with a manifest.json"
    )
    assert expected in result.stderr
