"""``python -m services.vision.defaults`` (run by ``make run``): default data, model and catalogue.

1. Fashion-MNIST: the installed Debian package ``dataset-fashion-mnist``, or that package unpacked
   into the data folder (``apt-get download`` + ``dpkg-deb -x``).
2. A model version, unless the store has one: ``services.vision.train`` with its defaults.
3. The default catalogue, unless the catalogue already holds products: the first Fashion-MNIST
   training images (never used for fine-tuning) as products, category = clothing class, no market.
   The index snapshot of the newest model is built here, so the service starts by loading it.
Each step skips work already done; CNN features are cached by content hash.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
from tqdm import tqdm

from services.runtime.config import load_settings
from services.runtime.model_store import ModelStore

from . import data, features, model, train
from .catalogue import Catalogue, NewProduct
from .config import VisionSettings
from .engine import Engine, EngineOptions
from .images import ImageLimits, decode, sha256
from .server import CATALOGUE_FILE

DEFAULT_CATALOGUE_SIZE = 5000


def index_default_catalogue(settings: VisionSettings, embedder: model.Embedder, size: int) -> int:
    """Put Fashion-MNIST training images 0..size-1 into an empty catalogue; returns how many."""
    catalogue = Catalogue(settings.vision_index_dir / CATALOGUE_FILE)
    try:
        if catalogue.count() > 0:
            print(f"vision catalogue present: {catalogue.count()} products")
            return 0
        split = data.load("train", settings.vision_data_dir)
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
        catalogue.close()


def build_index(settings: VisionSettings, embedder: model.Embedder) -> Engine:
    """Open the newest model's index (rebuilding it if needed) and leave a fresh snapshot on disk."""
    catalogue = Catalogue(settings.vision_index_dir / CATALOGUE_FILE)
    cache = features.FeatureCache(settings.vision_data_dir / "cache", embedder.image_size)
    try:
        options = EngineOptions(
            index_dir=settings.vision_index_dir,
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
        catalogue.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--catalogue-size", type=int, default=DEFAULT_CATALOGUE_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings(VisionSettings, "vision")
    folder = data.fetch(settings.vision_data_dir)
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
