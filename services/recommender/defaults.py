"""``python -m services.recommender.defaults``: the demo data and default model for ``make run``.

Skips everything when a valid recommender model version exists (``--force`` retrains). Otherwise
it generates the SYNTHETIC cross-border demo catalogue (see ``data.synthetic_catalogue``: users in
nine countries, product titles in eight languages, prices in local currencies), embeds the item
titles (cached by content hash), trains the hybrid (EASE + ALS + content + market-aware
popularity) with an evaluation on a random holdout, and saves a model version. A couple of
minutes on two cores the first time; instant afterwards.

The events recorded so far are training input too: the event store is opened as the service opens
it (``CBEC_STATE_DIR/recommender.sqlite3``, or the shared PostgreSQL with ``CBEC_STATE_BACKEND=shared``).
An event file from before the state layer (``data/recommender/events.sqlite3``) is imported into an
empty store once and renamed ``*.imported``. The embeddings cache lives in ``CBEC_STATE_DIR``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from services.runtime.config import load_settings
from services.runtime.device import Device
from services.runtime.model_store import ModelStore
from services.runtime.state import StateConfig

from .data import synthetic_catalogue
from .embeddings import Embedder, EmbeddingCache
from .events import EventStore
from .settings import RecommenderSettings
from .train import TrainConfig, embed_catalogue, prepare, run

DEMO = {"n_items": 600, "n_users": 800, "interactions_per_user": 20.0, "seed": 7}
LEGACY_EVENTS = Path("data/recommender/events.sqlite3")  # the event file before the state layer


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
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    settings = load_settings(RecommenderSettings, "recommender")
    events = EventStore.open(StateConfig.from_settings(settings), settings.events_synchronous)
    try:
        imported = events.import_legacy(LEGACY_EVENTS)
        if imported:
            print(f"recommender: imported {imported} events from {LEGACY_EVENTS}")
        store = ModelStore(args.models_dir, "recommender")
        existing = store.newest_valid()
        if existing is not None and not args.force:
            print(f"recommender: model version {existing.version} exists; nothing to do")
            return
        t0 = time.perf_counter()
        interactions, items = write_demo_data(args.data_dir)
        prepared = prepare(interactions, items, events, min_user_interactions=3)
    finally:
        events.close()
    assert settings.embeddings_cache is not None
    embedder = Embedder(EmbeddingCache(settings.embeddings_cache))
    embeddings = embed_catalogue(prepared.items, embedder, progress=True)
    config = TrainConfig(
        models=("popularity", "als", "session_ease", "content", "hybrid"),
        serve="hybrid",
        tune="none",
        splits=("random",),
        params={"als": {"factors": 32, "regularization": 5.0}},
    )
    out = settings.state_dir / "recommender" / "eval-demo"
    result = run(prepared, config, embeddings, Device("cpu"), store, out)
    hybrid = next(iter(result.evaluation["splits"].values()))["hybrid"]
    print(
        f"recommender: demo model {result.version} (synthetic catalogue, {prepared.encoding.n_items} items, "
        f"{prepared.encoding.n_users} users; hybrid ndcg@10={hybrid['ndcg@10']:.3f}) "
        f"in {time.perf_counter() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
