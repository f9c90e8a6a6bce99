"""``python -m services.vision.defaults`` (run by ``make run``): default data, model and catalogue.

1. Fashion-MNIST: the installed Debian package ``dataset-fashion-mnist``, or that package unpacked
   into the data folder (``apt-get download`` + ``dpkg-deb -x``).
2. A model version, unless the store has one: ``services.vision.train`` with its defaults.
3. With ``--catalogue-size N`` (default 0), a catalogue of Fashion-MNIST products unless the catalogue
   already holds products: the first N training images (never used for fine-tuning), category =
   clothing class, no market. ``make run`` leaves it empty: its demo catalogue's photos are loaded
   through the API once the service is up (``demo/seed.py``). A catalogue file from before the state
   layer (``var/vision/catalogue.sqlite``) is imported instead. The index snapshot of the newest model
   is built here, so the service starts by loading it.
Each step skips work already done; CNN features are cached by content hash. The catalogue is the
runtime's store ``vision``, opened as the service opens it (``CBEC_STATE_DIR/vision.sqlite3``, or the
shared PostgreSQL with ``CBEC_STATE_BACKEND=shared``); index snapshots go to the service's local cache.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys

import numpy as np
from tqdm import tqdm

from services.runtime.config import load_settings
from services.runtime.model_store import ModelStore
from services.runtime.state import StateConfig, open_database

from . import data, features, model, train
from .catalogue import Catalogue, NewProduct
from .config import VisionSettings
from .engine import Engine, EngineOptions
from .images import ImageLimits, decode, sha256
from .server import STORE

DEFAULT_CATALOGUE_SIZE = 0  # make run's products are the demo catalogue's, loaded by demo/seed.py
LEGACY_CATALOGUE = "catalogue.sqlite"  # the catalogue file in the snapshot folder before the state layer


def open_catalogue(settings: VisionSettings) -> Catalogue:
    """The service's catalogue, on the store the runtime would open (close it with ``close_catalogue``)."""
    return Catalogue(open_database(StateConfig.from_settings(settings), STORE))


def close_catalogue(catalogue: Catalogue) -> None:
    catalogue.close()
    catalogue.db.close()


def import_legacy_catalogue(settings: VisionSettings, catalogue: Catalogue) -> int:
    """Move the products of a pre-state-layer catalogue file (with their images and stored embeddings)
    into an empty catalogue, once; the file is then renamed ``*.imported``. Returns how many."""
    path = settings.index_cache_dir / LEGACY_CATALOGUE
    if not path.is_file() or catalogue.count() > 0:
        return 0
    old = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = old.execute(
            "SELECT row_id, product_id, category, market, sha256, image FROM products ORDER BY row_id"
        ).fetchall()
        moved = 0
        for start in range(0, len(rows), 500):
            batch = rows[start : start + 500]
            new_ids = catalogue.upsert(
                [NewProduct(str(p), str(c), str(m), str(s), bytes(i)) for _, p, c, m, s, i in batch], ""
            )
            mapping = {int(r[0]): new for r, new in zip(batch, new_ids, strict=True)}
            marks = ",".join("?" * len(batch))
            found: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
            for row_id, version, vec, dup in old.execute(
                f"SELECT row_id, model_version, vec, dup FROM embeddings WHERE row_id IN ({marks})",
                list(mapping),
            ):
                found.setdefault(str(version), []).append(
                    (
                        mapping[int(row_id)],
                        np.frombuffer(vec, dtype=np.float32),
                        np.frombuffer(dup, dtype=np.float16),
                    )
                )
            for version, items in found.items():
                catalogue.put_embeddings(version, items)
            moved += len(batch)
    finally:
        old.close()
    path.rename(path.with_name(path.name + ".imported"))
    print(f"vision catalogue: imported {moved} products from {path}")
    return moved


def drop_legacy_default(catalogue: Catalogue) -> int:
    """Remove ``make run``'s products from before the demo catalogue (Fashion-MNIST training images,
    ids ``fmnist-train-NNNNN``), which would otherwise answer the shop's visual searches."""
    ids = [p.product_id for p in catalogue.products() if p.product_id.startswith("fmnist-train-")]
    if ids:
        catalogue.remove(ids)
    return len(ids)


def index_default_catalogue(settings: VisionSettings, embedder: model.Embedder, size: int) -> int:
    """Put Fashion-MNIST training images 0..size-1 into an empty catalogue; returns how many."""
    catalogue = open_catalogue(settings)
    try:
        import_legacy_catalogue(settings, catalogue)
        if size <= 0:
            dropped = drop_legacy_default(catalogue)
            if dropped:
                print(f"vision catalogue: removed {dropped} products of the pre-demo default catalogue")
            print(f"vision catalogue: {catalogue.count()} products (make run loads the demo catalogue's)")
            return 0
        if catalogue.count() > 0:
            print(f"vision catalogue present: {catalogue.count()} products")
            return 0
        split = data.load("train", settings.vision_data_dir, settings.vision_fashion_mnist_dir)
        size = min(size, train.CATALOGUE_RESERVED, len(split))
        pngs = [split.png(i) for i in tqdm(range(size), desc="catalogue: encode", unit="img")]
        limits = ImageLimits()
        pixels = np.stack([decode(p, embedder.image_size, limits) for p in pngs])
        cache = features.FeatureCache(settings.vision_data_dir / "cache", embedder.image_size)
        feats = features.extract(pixels, embedder.backbone, cache, desc="CNN features (catalogue)")
        cache.close()
        vectors, duplicates = embedder.embed_features(feats), embedder.duplicates(feats)
        products = [
            NewProduct(
                data.product_id("train", i), data.CLASSES[int(split.labels[i])], "", sha256(p), p, v, d
            )
            for i, (p, v, d) in enumerate(zip(pngs, vectors, duplicates, strict=True))
        ]
        for start in tqdm(range(0, len(products), 1000), desc="catalogue: store", unit="batch"):
            catalogue.upsert(products[start : start + 1000], embedder.version)
        return len(products)
    finally:
        close_catalogue(catalogue)


def build_index(settings: VisionSettings, embedder: model.Embedder) -> Engine:
    """Open the newest model's index (rebuilding it if needed) and leave a fresh snapshot on disk."""
    catalogue = open_catalogue(settings)
    cache = features.FeatureCache(settings.vision_data_dir / "cache", embedder.image_size)
    try:
        options = EngineOptions(
            index_dir=settings.index_cache_dir,
            exact_max=settings.vision_exact_max,
            nprobe=settings.vision_ivf_nprobe,
            snapshot_every=settings.vision_snapshot_every,
            progress=True,
            feature_cache=cache,
        )
        engine = Engine.open(embedder, catalogue, options)
        engine.snapshot()
        return engine
    finally:
        cache.close()
        close_catalogue(catalogue)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--catalogue-size", type=int, default=DEFAULT_CATALOGUE_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings(VisionSettings, "vision")
    folder = data.fetch(settings.vision_data_dir, settings.vision_fashion_mnist_dir)
    print(f"Fashion-MNIST: {folder}")
    status = train.main(["--if-missing"])
    if status:
        return status
    entry = ModelStore(settings.models_dir, "vision").newest_valid()
    if entry is None:
        print("no valid vision model version after training", file=sys.stderr)
        return 1
    embedder = model.load(entry.path, entry.version)
    added = index_default_catalogue(settings, embedder, args.catalogue_size)
    engine = build_index(settings, embedder)
    stats = engine.stats()
    print(
        f"vision index: {stats['size']} products ({added} added now), {stats['index_type']}, "
        f"model {stats['model_version']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
