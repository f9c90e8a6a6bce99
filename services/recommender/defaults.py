"""``python -m services.recommender.defaults``: the demo data and default model for ``make run``.

Skips everything when a valid recommender model version trained on the current demo catalogue exists
(``--force`` retrains; a model from before the catalogue, or from an older build of it, is replaced).
Otherwise
it trains on the demo catalogue every service shares (``demo/catalogue.py``, built here if missing:
the clothing items with real reviews, SYNTHETIC shoppers in nine markets and their interactions),
embeds the item titles (cached by content hash), trains the hybrid (EASE + ALS + content +
market-aware popularity) with an evaluation on a random holdout, and saves a model version. About a
minute on two cores the first time; instant afterwards.

The events recorded so far are training input too: the event store is opened as the service opens
it (``CBEC_STATE_DIR/recommender.sqlite3``, or the shared PostgreSQL with ``CBEC_STATE_BACKEND=shared``).
An event file from before the state layer (``data/recommender/events.sqlite3``) is imported into an
empty store once and renamed ``*.imported``. The embeddings cache lives in ``CBEC_STATE_DIR``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from services.runtime.config import load_settings
from services.runtime.device import Device
from services.runtime.model_store import Manifest, ModelStore
from services.runtime.state import StateConfig

from .embeddings import Embedder, EmbeddingCache
from .events import EventStore
from .settings import RecommenderSettings
from .train import TrainConfig, embed_catalogue, prepare, run

LEGACY_EVENTS = Path("data/recommender/events.sqlite3")  # the event file before the state layer


def demo_data(demo_dir: Path) -> tuple[Path, Path]:
    """The shared demo catalogue's interactions and items files (built when missing)."""
    from demo.catalogue import Params, build

    if not (demo_dir / "manifest.json").exists():  # built by the launcher, maybe with other parameters
        build(demo_dir, Params())
    return demo_dir / "interactions.parquet", demo_dir / "items.parquet"


def trained_on(manifest: Manifest | None, interactions: Path) -> bool:
    """Whether a model version was trained on this interactions file as it is now."""
    return (
        manifest is not None
        and manifest.params.get("source") == str(interactions)
        and manifest.created.timestamp() >= interactions.stat().st_mtime
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, help="default: the settings' CBEC_MODELS_DIR (models)")
    parser.add_argument("--demo-dir", type=Path, default=Path("data/demo"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    settings = load_settings(RecommenderSettings, "recommender")
    models_dir = args.models_dir or settings.models_dir
    events = EventStore.open(StateConfig.from_settings(settings), settings.events_synchronous)
    try:
        imported = events.import_legacy(LEGACY_EVENTS)
        if imported:
            print(f"recommender: imported {imported} events from {LEGACY_EVENTS}")
        store = ModelStore(models_dir, "recommender")
        existing = store.newest_valid()
        t0 = time.perf_counter()
        interactions, items = demo_data(args.demo_dir)
        if existing is not None and not args.force and trained_on(existing.manifest, interactions):
            print(f"recommender: model version {existing.version} exists; nothing to do")
            return
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
        f"recommender: demo model {result.version} (demo catalogue, {prepared.encoding.n_items} items, "
        f"{prepared.encoding.n_users} users; hybrid ndcg@10={hybrid['ndcg@10']:.3f}) "
        f"in {time.perf_counter() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
