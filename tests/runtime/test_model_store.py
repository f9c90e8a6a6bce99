from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.runtime.model_store import (
    MANIFEST,
    Manifest,
    ModelLoadError,
    ModelSlot,
    ModelStore,
    fingerprint,
)


def write(store: ModelStore, value: int, fail: bool = False) -> str:
    with store.new_version(metrics={"auc": 0.9}, data_fingerprint="abc", params={"v": value}) as (
        path,
        manifest,
    ):
        (path / "model.json").write_text(json.dumps({"value": value, "fail": fail}))
    return manifest.version


def loader(path: Path, manifest: Manifest) -> int:
    raw = json.loads((path / "model.json").read_text())
    if raw["fail"]:
        raise ValueError("corrupt")
    return raw["value"]


def test_versions_are_written_atomically_and_listed_newest_first(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "svc")
    v1 = write(store, 1)
    v2 = write(store, 2)
    assert [e.version for e in store.versions()] == [v2, v1]
    m = Manifest.read(store.dir / v2)
    assert (m.metrics, m.data_fingerprint, m.params, m.service) == ({"auc": 0.9}, "abc", {"v": 2}, "svc")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "svc")
    with pytest.raises(RuntimeError), store.new_version() as (path, _):
        (path / "half").write_text("x")
        raise RuntimeError("training crashed")
    assert store.versions() == []
    assert list(store.dir.iterdir()) == []


def test_invalid_manifest_is_listed_with_reason(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "svc")
    good = write(store, 1)
    bad = store.dir / "99999999T000000000000Z"
    bad.mkdir()
    (bad / MANIFEST).write_text("{not json")
    entries = store.versions()
    assert entries[0].version == bad.name and not entries[0].valid and entries[0].error
    assert store.newest_valid().version == good


async def test_slot_falls_back_to_older_version_and_keeps_serving_on_failure(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "svc")
    v1 = write(store, 1)
    write(store, 2, fail=True)
    slot = ModelSlot(store, loader)
    loaded = await slot.load()
    assert (loaded.model, loaded.manifest.version) == (1, v1)
    v3 = write(store, 3)
    taken = slot.require()  # a call in flight holds the old model
    assert (await slot.load(v3)).model == 3
    assert taken.model == 1 and slot.require().model == 3
    broken = write(store, 4, fail=True)
    with pytest.raises(ModelLoadError, match="corrupt"):
        await slot.load(broken)
    assert slot.require().model == 3
    with pytest.raises(ModelLoadError, match="no version"):
        await slot.load("nope")


async def test_concurrent_loads_are_serialised(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "svc")
    write(store, 1)
    slot = ModelSlot(store, loader)
    results = await asyncio.gather(slot.load(), slot.load())
    assert [r.model for r in results] == [1, 1]


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_text("x")
    first = fingerprint(a)
    a.write_text("y")
    assert fingerprint(a) != first
