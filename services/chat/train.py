"""Build a chat model version: embed the labelled intent examples, tune retrieval fusion, the intent
classifier and the hand-off threshold on the development set (never on the evaluation set), and write
the version atomically into the model store with its development metrics.

    python -m services.chat.train [--models-dir DIR] [--seed]

The knowledge base is read from the configured store (``CBEC_STATE_*``: the embedded file under
``CBEC_STATE_DIR`` or the shared PostgreSQL), so a training Job in the cluster trains on what is served.
``--seed`` first writes the packaged articles that are missing or changed into that store (never over an
article replaced through UpsertKnowledge), so a Job can prepare an empty shared store itself.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.runtime.config import load_settings
from services.runtime.model_store import ModelStore, fingerprint
from services.runtime.state import StateConfig

from .config import ChatSettings
from .evaluate import DEV_FILE, embed_questions, evaluate, load_questions
from .faithfulness import calibrate
from .index import HybridIndex, RetrievalParams
from .intent import EXAMPLES_FILE, IntentModel, IntentParams, load_examples
from .knowledge import Embedder, knowledge_files
from .model import Policy, save_params
from .store import ChatStore

log = logging.getLogger("cbec.chat.train")
# Bump when the model format or the training procedure changes (part of the data fingerprint).
TRAIN_REVISION = "5"


def data_fingerprint() -> str:
    files = [*knowledge_files(), EXAMPLES_FILE, DEV_FILE]
    return f"r{TRAIN_REVISION}-" + fingerprint(*files)


def tune_retrieval(
    questions: Any, vectors: np.ndarray, index: HybridIndex, intent: IntentModel
) -> RetrievalParams:
    best, best_key = RetrievalParams(), (-1.0, -1.0, False)
    grid = list(itertools.product((10.0, 30.0, 60.0), (0.0, 0.25, 0.5, 1.0), (10, 20)))
    for rrf_k, bm25_w, depth in tqdm(grid, desc="tune retrieval", leave=False):
        params = RetrievalParams(rrf_k=rrf_k, bm25_weight=bm25_w, depth=depth)
        m = evaluate(questions, vectors, index, params, intent)
        key = (m["retrieval_top1"], m["retrieval_top3"], bm25_w > 0)  # ties go to the hybrid
        if key > best_key:
            best, best_key = params, key
    return best


def tune_intent(
    questions: Any, vectors: np.ndarray, index: HybridIndex, retrieval: RetrievalParams, intent: IntentModel
) -> IntentParams:
    """Highest dev accuracy; among equals, the lowest log-loss, so that the temperature (which hardly
    moves the argmax) is chosen for calibrated confidences, which the hand-off threshold relies on."""
    best, best_key = intent.params, (-1.0, -1e9)
    grid = list(
        itertools.product((0.01, 0.02, 0.03, 0.05, 0.08), (1, 2, 3), (-0.05, 0.0, 0.05), (0.0, 0.02, 0.05))
    )
    for temp, top, bias, bonus in tqdm(grid, desc="tune intent", leave=False):
        params = IntentParams(temperature=temp, top_examples=top, article_bias=bias, rank_bonus=bonus)
        m = evaluate(questions, vectors, index, retrieval, intent.with_params(params))
        probs = np.array([p["true_intent_probability"] for p in m["predictions"]])
        key = (m["intent_accuracy"], -float(np.mean(-np.log(np.clip(probs, 1e-6, 1.0)))))
        if key > best_key:
            best, best_key = params, key
    return best


def tune_threshold(predictions: list[dict[str, Any]]) -> float:
    """Hand off below t: maximise (answered correctly) - 2 x (answered wrongly) on the dev set."""
    best_t, best_u = 0.0, -1e9
    for t in np.arange(0.0, 0.81, 0.05):
        kept = [p for p in predictions if p["intent_confidence"] >= t]
        utility = sum(1 if p["predicted_intent"] == p["intent"] else -2 for p in kept)
        if utility > best_u:
            best_t, best_u = float(round(t, 2)), utility
    return best_t


def build_intent_model(examples: list[tuple[str, str]], embedder: Embedder) -> IntentModel:
    texts = [t for t, _ in examples]
    steps = range(0, len(texts), 16)
    vectors = np.concatenate(
        [embedder.query(texts[i : i + 16]) for i in tqdm(steps, desc="embed intent examples")]
    )
    return IntentModel(vectors, [label for _, label in examples])


def write_version(
    models_dir: Path,
    intent: IntentModel,
    retrieval: RetrievalParams,
    policy: Policy,
    metrics: dict[str, float],
    data_fp: str,
    params: dict[str, Any],
) -> str:
    store = ModelStore(models_dir, "chat")
    params = {"retrieval": vars(retrieval), "intent": vars(intent.params), "policy": vars(policy), **params}
    with store.new_version(metrics, data_fp, params) as (path, manifest):
        intent.save(path)
        save_params(path, retrieval, policy)
    return manifest.version


def train(models_dir: Path, state: StateConfig, embedder: Embedder | None = None) -> str:
    embedder = embedder or Embedder()
    store = ChatStore.open(state)
    try:
        articles = store.articles()
    finally:
        store.close()
    if not articles:
        where = "the shared store" if state.shared else str(state.state_dir)
        raise RuntimeError(f"the knowledge base in {where} is empty: run python -m services.chat.defaults")
    index = HybridIndex(articles)
    examples = load_examples()
    intent = build_intent_model(examples, embedder)
    dev = load_questions(DEV_FILE)
    dev_vectors = embed_questions(embedder, dev)
    retrieval = tune_retrieval(dev, dev_vectors, index, intent)
    intent = intent.with_params(tune_intent(dev, dev_vectors, index, retrieval, intent))
    metrics = evaluate(dev, dev_vectors, index, retrieval, intent)
    support = calibrate(articles, embedder)  # the faithfulness check's similarity floor
    policy = Policy(
        handoff_threshold=tune_threshold(metrics["predictions"]),
        support_threshold=float(support["threshold"]),  # type: ignore[arg-type]
    )
    names = ("retrieval_top1", "retrieval_top3", "intent_accuracy")
    dev_metrics = {f"dev_{k}": float(metrics[k]) for k in names}
    dev_metrics["support_balanced_accuracy"] = float(support["balanced_accuracy"])  # type: ignore[arg-type]
    counts = {"articles": len(articles), "intent_examples": len(examples), "dev_questions": len(dev)}
    version = write_version(models_dir, intent, retrieval, policy, dev_metrics, data_fingerprint(), counts)
    log.info("trained chat model %s: %s", version, dev_metrics)
    return version


def current_version_matches(models_dir: Path) -> bool:
    newest = ModelStore(models_dir, "chat").newest_valid()
    return bool(newest and newest.manifest and newest.manifest.data_fingerprint == data_fingerprint())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="default: CBEC_MODELS_DIR")
    parser.add_argument("--seed", action="store_true", help="seed the packaged knowledge base first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    settings = load_settings(ChatSettings, "chat")
    state = StateConfig.from_settings(settings)
    embedder = Embedder()
    if args.seed:
        from .defaults import seed_knowledge  # defaults imports this module

        store = ChatStore.open(state)
        try:
            log.info("seeded %d articles", seed_knowledge(store, embedder))
        finally:
            store.close()
    print(train(args.models_dir or settings.models_dir, state, embedder))


if __name__ == "__main__":
    main()
