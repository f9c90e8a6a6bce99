"""``python -m services.recommender.defaults``: the demo data and default model for ``make run``.

Skips everything when a valid recommender model version exists (``--force`` retrains). Otherwise
it generates the SYNTHETIC cross-border demo catalogue (see ``data.synthetic_catalogue``: users in
nine countries, product titles in eight languages, prices in local currencies), embeds the item
titles (cached by content hash), trains the hybrid (EASE + ALS + content + market-aware
popularity) with an evaluation on a random holdout, and saves a model version. A couple of
minutes on two cores the first time; instant afterwards.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from services.runtime.device import Device
from services.runtime.model_store import ModelStore

from .data import synthetic_catalogue
from .embeddings import Embedder, EmbeddingCache
from .train import TrainConfig, embed_catalogue, prepare, run

DEMO = {"n_items": 600, "n_users": 800, "interactions_per_user": 20.0, "seed": 7}


def write_demo_data(data_dir: Path) -> tuple[Path, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    interactions, items = data_dir / "demo_interactions.parquet", data_dir / "demo_items.parquet"
    if not (interactions.exists() and items.exists()):
        demo = synthetic_catalogue(**DEMO)  # type: ignore[arg-type]
        demo.interactions.to_parquet(interactions, index=False)
        demo.items.to_parquet(items, index=False)
    return interactions, items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=Path(os.environ.get("CBEC_MODELS_DIR", "models")))
    parser.add_argument("--data-dir", type=Path, default=Path("data/recommender"))
    parser.add_argument(
        "--events",
        type=Path,
        default=Path(os.environ.get("CBEC_EVENTS_PATH", "data/recommender/events.sqlite3")),
    )
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    store = ModelStore(args.models_dir, "recommender")
    existing = store.newest_valid()
    if existing is not None and not args.force:
        print(f"recommender: model version {existing.version} exists; nothing to do")
        return
    t0 = time.perf_counter()
    interactions, items = write_demo_data(args.data_dir)
    events = args.events if args.events.is_file() else None
    prepared = prepare(interactions, items, events, min_user_interactions=3)
    embedder = Embedder(EmbeddingCache(args.data_dir / "embeddings.sqlite3"))
    embeddings = embed_catalogue(prepared.items, embedder, progress=True)
    config = TrainConfig(
        models=("popularity", "als", "session_ease", "content", "hybrid"),
        serve="hybrid",
        tune="none",
        splits=("random",),
        params={"als": {"factors": 32, "regularization": 5.0}},
    )
    result = run(prepared, config, embeddings, Device("cpu"), store, Path("var/recommender/eval-demo"))
    hybrid = next(iter(result.evaluation["splits"].values()))["hybrid"]
    print(
        f"recommender: demo model {result.version} (synthetic catalogue, {prepared.encoding.n_items} items, "
        f"{prepared.encoding.n_users} users; hybrid ndcg@10={hybrid['ndcg@10']:.3f}) "
        f"in {time.perf_counter() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
