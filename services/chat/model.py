"""The chat model version: what ``train.py`` writes and the model slot loads.

A version holds the intent classifier (example vectors, tuned parameters), the retrieval fusion
parameters and the hand-off threshold, all tuned on the development set; the LLM backend is loaded
with it (from the settings) so a version is serving only when its generator is ready.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from services.runtime.model_store import Manifest

from .config import ChatSettings
from .index import RetrievalParams
from .intent import IntentModel
from .llm import LLMBackend, load_backend


@dataclass(frozen=True)
class Policy:
    # Below this intent confidence the assistant hands the conversation to a person.
    handoff_threshold: float = 0.3
    # Least e5 similarity between an LLM sentence and an evidence sentence for it to count as supported;
    # calibrated at training time on the knowledge base's parallel translations (faithfulness.calibrate).
    support_threshold: float = 0.85


@dataclass
class ChatModel:
    intent: IntentModel
    retrieval: RetrievalParams
    policy: Policy
    llm: LLMBackend | None
    manifest: Manifest | None = None


def save_params(path: Path, retrieval: RetrievalParams, policy: Policy) -> None:
    (path / "retrieval.json").write_text(json.dumps(asdict(retrieval), indent=2))
    (path / "policy.json").write_text(json.dumps(asdict(policy), indent=2))


def load_params(path: Path) -> tuple[RetrievalParams, Policy]:
    retrieval = RetrievalParams(**json.loads((path / "retrieval.json").read_text()))
    policy = Policy(**json.loads((path / "policy.json").read_text()))
    return retrieval, policy


def llm_from_settings(settings: ChatSettings, device: str) -> LLMBackend | None:
    languages = frozenset(x.strip() for x in settings.llm_languages.split(",") if x.strip())
    return load_backend(
        settings.llm_backend,
        settings.llm_path,
        languages,
        device=device,
        threads=settings.llm_threads,
        parallel=settings.llm_parallel,
        context_per_slot=settings.llm_context,
        gpu_layers=settings.llm_gpu_layers,
        url=settings.llm_url,
        model=settings.llm_model,
        api_key=settings.llm_api_key.get_secret_value(),
        timeout_s=settings.llm_timeout_s,
    )


def load_chat_model(path: Path, manifest: Manifest, llm: LLMBackend | None) -> ChatModel:
    retrieval, policy = load_params(path)
    return ChatModel(IntentModel.load(path), retrieval, policy, llm, manifest)
