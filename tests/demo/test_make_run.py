"""``make run``'s preparation on the demo catalogue: the launcher builds it, the recommender's defaults
train on it (and only once), vision's defaults clear the products of the pre-demo default catalogue."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from services.runtime.model_store import ModelStore
from tools import launcher


def test_the_launcher_builds_the_catalogue_and_trains_the_recommender_on_it(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CBEC_")}
    base.update({"CBEC_STATE_DIR": str(tmp_path / "state"), "OPENBLAS_NUM_THREADS": "1"})
    env = launcher.environment(base, tmp_path / "models", 2.0)
    demo = tmp_path / "demo"
    launcher.build_demo(demo, env)
    items = pd.read_parquet(demo / "items.parquet")
    spec = next(s for s in launcher.discover() if s.name == "recommender")
    launcher.prepare(spec, env, demo)
    store = ModelStore(tmp_path / "models", "recommender")
    first = store.newest_valid()
    assert first is not None and first.manifest is not None
    assert first.manifest.params["source"] == str(demo / "interactions.parquet")
    assert first.manifest.params["items"] == len(items)
    launcher.prepare(spec, env, demo)  # nothing changed: no new version
    again = store.newest_valid()
    assert again is not None and again.version == first.version
    os.utime(demo / "interactions.parquet")  # a rebuilt catalogue: trained again
    launcher.prepare(spec, env, demo)
    newest = store.newest_valid()
    assert newest is not None and newest.version != first.version


def test_vision_defaults_drop_the_pre_demo_catalogue_only(tmp_path: Path) -> None:
    from services.vision.catalogue import Catalogue, NewProduct
    from services.vision.defaults import drop_legacy_default

    catalogue = Catalogue(tmp_path / "c.sqlite")
    png = (Path(__file__).parent / "test_make_run.py").read_bytes()[:64]  # any bytes: not decoded here
    catalogue.upsert(
        [
            NewProduct("fmnist-train-00001", "Dress", "", "a" * 64, png),
            NewProduct("fmnist-train-00002", "Bag", "", "b" * 64, png),
            NewProduct("P1078", "Dresses", "", "c" * 64, png),
        ],
        "",
    )
    assert drop_legacy_default(catalogue) == 2
    assert [p.product_id for p in catalogue.products()] == ["P1078"]
    assert drop_legacy_default(catalogue) == 0
    catalogue.close()
