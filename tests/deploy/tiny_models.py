"""Small real model versions of every service, written into one model store for the chart harness.

Each is built by the service's own training code on a small slice of real or synthetic data (the same
sizes the services' own test fixtures use), so the harness starts every pod in a few seconds and
measures the platform (state, replicas, failures), not model quality.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.progress import Progress


def risk(models_dir: Path) -> str:
    from services.risk.features import RatesTable
    from services.risk.train import TrainConfig, build_dataset, fit, save_version
    from tests.risk.synth import stream

    config = TrainConfig(trees=40, forest_trees=25, early_stopping=15, threads=1, progress=False, plots=False)
    rates = RatesTable.load()
    result = fit(build_dataset(stream(), rates, progress=False), rates, config)
    return save_version(models_dir, result, "synthetic-test-stream", {"synthetic": True}, plots=False)


def recommender(models_dir: Path, work: Path, demo_dir: Path | None = None) -> str:
    """On the demo catalogue's items and interactions when ``demo_dir`` is given, else synthetic."""
    from services.recommender.data import synthetic_catalogue
    from services.recommender.embeddings import Embedder, EmbeddingCache
    from services.recommender.train import TrainConfig, embed_catalogue, prepare, run
    from services.runtime.device import Device
    from services.runtime.model_store import ModelStore

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if demo_dir is not None:
        interactions, items = demo_dir / "interactions.parquet", demo_dir / "items.parquet"
    else:
        data = synthetic_catalogue(n_items=40, n_users=60, interactions_per_user=12, seed=3)
        interactions, items = work / "interactions.csv", work / "items.parquet"
        data.interactions.to_csv(interactions, index=False)
        data.items.to_parquet(items, index=False)
    prepared = prepare(interactions, items)
    embeddings = embed_catalogue(prepared.items, Embedder(EmbeddingCache(work / "embeddings.sqlite3")))
    config = TrainConfig(
        models=("popularity", "als", "ease", "content", "hybrid"),
        serve="hybrid",
        tune="none",
        evaluate=False,
        progress=False,
        params={"als": {"factors": 8, "regularization": 1.0, "iterations": 5}, "ease": {"l2": 20.0}},
    )
    store = ModelStore(models_dir, "recommender")
    return run(prepared, config, embeddings, Device("cpu"), store, None).version


def sentiment(models_dir: Path, work: Path) -> str:
    import json

    import pandas as pd

    from services.sentiment.data import load_reviews
    from services.sentiment.embed import EmbeddingCache, embed_cached
    from services.sentiment.encoder import Encoder
    from services.sentiment.train import Embedded, HeadParams, train

    df = load_reviews()
    short = df[df["text"].str.len().between(40, 120)]
    parts = []
    for split, n in {"train": 16, "val": 5, "test": 5}.items():
        for label in range(3):
            pool = short[(short["split"] == split) & (short["label"] == label)]
            parts.append(pool.sample(n=n, random_state=1))
    sample = pd.concat(parts).reset_index(drop=True)
    encoder = Encoder()
    cache = EmbeddingCache.in_dir(work / "sentiment-cache", encoder.name)
    result = embed_cached(encoder, sample["text"].tolist(), cache, desc="harness sample")
    data = Embedded(sample, result.vectors, result.from_cache, result.embedded, result.seconds, len(sample))
    multilingual = work / "multilingual.jsonl"
    rows = [
        {"language": "de", "stars": 1, "text": "Schlechte Qualität, die Naht ist sofort gerissen."},
        {"language": "es", "stars": 5, "text": "Me encanta, es precioso y cómodo."},
    ]
    multilingual.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    version, _ = train(
        models_dir,
        encoder=encoder,
        candidates=(HeadParams(hidden=32, epochs=20, dropout=0.1, weight_decay=1e-3),),
        multilingual_path=multilingual,
        data=data,
    )
    return version


def vision(models_dir: Path) -> str:
    """The pretrained backbone at 32 px with a duplicate projector fitted on synthetic product photos."""
    import numpy as np

    from services.runtime.model_store import ModelStore
    from services.vision import features, model, train
    from services.vision.images import ImageLimits, decode
    from tests.vision import imagegen

    pngs = [
        imagegen.encode(imagegen.draw(shape, colour, seed=7000 + 97 * s + 13 * c))
        for s, shape in enumerate(imagegen.SHAPES)
        for c, colour in enumerate(imagegen.COLOURS)
    ]
    pixels = np.stack([decode(p, 32, ImageLimits()) for p in pngs])
    projector = model.DuplicateProjector.fit(features.extract(pixels, progress=False), dim=16)
    spec = model.pretrained_spec(32, 0.9)
    result = train.FitResult(spec, None, projector, {"val_precision_at_10": 0.0}, {"kind": "pretrained"})
    return train.write_version(ModelStore(models_dir, "vision"), result)


def chat(models_dir: Path) -> str:
    from services.chat.index import RetrievalParams
    from services.chat.intent import IntentParams, load_examples
    from services.chat.knowledge import Embedder
    from services.chat.model import Policy
    from services.chat.train import build_intent_model, write_version

    intents = {"shipping", "returns", "tracking", "order_status", "start_return", "human_agent", "complaint"}
    examples = [e for e in load_examples() if e[1] in intents]
    intent = build_intent_model(examples, Embedder()).with_params(IntentParams(temperature=0.02))
    return write_version(
        models_dir,
        intent,
        RetrievalParams(rrf_k=30, bm25_weight=0.5),
        Policy(handoff_threshold=0.3),
        {"dev_intent_accuracy": 0.0},
        "harness",
        {},
    )


def build_all(
    models_dir: Path, work: Path, demo_dir: Path | None = None, skip: frozenset[str] = frozenset()
) -> dict[str, str]:
    """A version of every service in ``models_dir`` but those in ``skip``; returns {service: version}.
    ``demo_dir``: a demo catalogue (``demo.catalogue``) for the recommender to learn."""
    work.mkdir(parents=True, exist_ok=True)
    steps = {
        "risk": lambda: risk(models_dir),
        "recommender": lambda: recommender(models_dir, work, demo_dir),
        "vision": lambda: vision(models_dir),
        "chat": lambda: chat(models_dir),
        "sentiment": lambda: sentiment(models_dir, work),
    }
    steps = {name: step for name, step in steps.items() if name not in skip}
    versions: dict[str, str] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("tiny models", total=len(steps))
        for name, step in steps.items():
            progress.update(task, description=f"tiny model: {name}")
            versions[name] = step()
            progress.advance(task)
    return versions
