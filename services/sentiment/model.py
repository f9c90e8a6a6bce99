"""Sentiment models behind one interface, and loading them from a model-store version folder.

Three kinds of version exist (``params.kind`` in the manifest):

* ``head``: a small torch head on multilingual-e5-small sentence embeddings (``head.pt`` +
  ``head.json``). It predicts the 5 star ratings; negative / neutral / positive probabilities are sums
  over stars 1-2 / 3 / 4-5, calibrated on the validation split (temperature and per-class bias), and
  the label comes from a decision rule tuned on validation for macro-F1 (the neutral class is rare and
  hard, so plain argmax almost never says "neutral").
* ``finetuned``: the encoder's top layers fine-tuned with a linear head (``top.pt`` +
  ``finetuned.json``, see ``finetune.py``); the packaged bottom layers run first. Same calibration.
* ``hf``: a fine-tuned Hugging Face sequence-classification directory (``hf/``), e.g. a bigger model
  trained on a GPU node. Its labels are read from ``config.id2label``: three sentiment labels, or five
  star labels ("1 star" .. "5 stars"). An optional ``calibration.json`` beside it is applied the same
  way as the head's.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from services.runtime.model_store import Manifest, ModelStore

from .encoder import DIM, Encoder, Prepared, clean, compatible_names

LABEL_NAMES = ("negative", "neutral", "positive")
STAR_GROUPS = ((0, 1), (2,), (3, 4))  # star index (0 = 1 star) -> sentiment class
DEFAULT_CLASS_STARS = (1.5, 3.0, 4.5)


@dataclass
class Calibration:
    """p = softmax(log p_raw / temperature + bias); label = argmax(log p + decision)."""

    temperature: float = 1.0
    bias: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    decision: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    class_stars: list[float] = field(default_factory=lambda: list(DEFAULT_CLASS_STARS))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        cal = cls(
            temperature=float(raw.get("temperature", 1.0)),
            bias=[float(x) for x in raw.get("bias", [0, 0, 0])],
            decision=[float(x) for x in raw.get("decision", [0, 0, 0])],
            class_stars=[float(x) for x in raw.get("class_stars", DEFAULT_CLASS_STARS)],
        )
        if (
            not cal.temperature > 0
            or len(cal.bias) != 3
            or len(cal.decision) != 3
            or len(cal.class_stars) != 3
        ):
            raise ValueError(f"invalid calibration {raw}")
        return cal

    def apply(self, log_p3: np.ndarray) -> np.ndarray:
        z = log_p3 / self.temperature + np.asarray(self.bias)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def decide(self, p3: np.ndarray) -> np.ndarray:
        return np.argmax(np.log(np.clip(p3, 1e-12, 1)) + np.asarray(self.decision), axis=1)


@dataclass
class Scores:
    probs: np.ndarray  # (n, 3) calibrated negative / neutral / positive
    labels: np.ndarray  # (n,) 0 negative, 1 neutral, 2 positive
    stars: np.ndarray  # (n,) expected star rating, 1..5


def star_logits_to_scores(star_logits: np.ndarray, cal: Calibration) -> Scores:
    """From 5 star logits: grouped log-probabilities, calibration, expected stars, decision."""
    z = star_logits - star_logits.max(axis=1, keepdims=True)
    p5 = np.exp(z)
    p5 /= p5.sum(axis=1, keepdims=True)
    p3_raw = np.stack([p5[:, list(g)].sum(axis=1) for g in STAR_GROUPS], axis=1)
    probs = cal.apply(np.log(np.clip(p3_raw, 1e-12, 1)))
    stars_of = np.arange(1, 6, dtype=np.float64)
    within = np.stack(
        [
            (p5[:, list(g)] * stars_of[list(g)]).sum(axis=1)
            / np.clip(p5[:, list(g)].sum(axis=1), 1e-12, None)
            for g in STAR_GROUPS
        ],
        axis=1,
    )
    stars = (probs * within).sum(axis=1)
    return Scores(probs, cal.decide(probs), np.clip(stars, 1.0, 5.0))


def class_logits_to_scores(logits: np.ndarray, cal: Calibration) -> Scores:
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    probs = cal.apply(log_p)
    stars = probs @ np.asarray(cal.class_stars)
    return Scores(probs, cal.decide(probs), np.clip(stars, 1.0, 5.0))


class Head(nn.Module):
    """Embedding -> 5 star logits (+ 1 "recommended" logit used only as an auxiliary training target)."""

    def __init__(self, dim: int = DIM, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "dropout": dropout}
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Dropout(dropout / 2),
                nn.Linear(dim, hidden),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, 6),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout / 2), nn.Linear(dim, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HeadEnsemble(nn.Module):
    """Heads trained on different cross-validation folds; their star log-probabilities are averaged."""

    def __init__(self, dim: int = DIM, hidden: int = 256, dropout: float = 0.2, members: int = 5) -> None:
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "dropout": dropout, "members": members}
        self.heads = nn.ModuleList(Head(dim, hidden, dropout) for _ in range(members))

    @classmethod
    def of(cls, heads: Sequence[Head]) -> HeadEnsemble:
        c = heads[0].config
        ensemble = cls(c["dim"], c["hidden"], c["dropout"], len(heads))
        for mine, trained in zip(ensemble.heads, heads, strict=True):
            mine.load_state_dict(trained.state_dict())
        return ensemble.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [h(x) for h in self.heads]
        stars = torch.stack([torch.log_softmax(o[:, :5], dim=1) for o in outs]).mean(dim=0)
        recommended = torch.stack([o[:, 5:] for o in outs]).mean(dim=0)
        return torch.cat([stars, recommended], dim=1)


class SentimentModel(Protocol):
    kind: str
    max_tokens: int

    def prepare(self, text: str) -> Prepared: ...

    def score(self, texts: Sequence[str]) -> Scores:
        """Score prepared texts (``prepare(...).text``)."""
        ...


class HeadModel:
    """The default model: multilingual-e5-small embeddings + a torch head."""

    kind = "head"

    def __init__(
        self, encoder: Encoder, head: Head | HeadEnsemble, calibration: Calibration, device: str = "cpu"
    ) -> None:
        self.encoder = encoder
        self.head = head.to(device).eval()
        self.calibration = calibration
        self.device = device
        self.max_tokens = encoder.max_tokens

    def prepare(self, text: str) -> Prepared:
        return self.encoder.prepare(text)

    def score_embeddings(self, emb: np.ndarray) -> Scores:
        with torch.inference_mode():
            out = (
                self.head(torch.as_tensor(emb, dtype=torch.float32, device=self.device)).float().cpu().numpy()
            )
        return star_logits_to_scores(out[:, :5].astype(np.float64), self.calibration)

    def score(self, texts: Sequence[str]) -> Scores:
        return self.score_embeddings(self.encoder.embed(texts))

    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        torch.save(self.head.state_dict(), folder / "head.pt")
        meta = {
            "head": self.head.config,
            "calibration": asdict(self.calibration),
            **self.encoder.describe(),
            "pool_layers": self.encoder.pool_layers,
            **(extra or {}),
        }
        (folder / "head.json").write_text(json.dumps(meta, indent=2))


def load_head(folder: Path, encoder: Encoder, device: str = "cpu") -> HeadModel:
    meta = json.loads((folder / "head.json").read_text())
    if meta.get("encoder") not in compatible_names():
        raise ValueError(
            f"head was trained on {meta.get('encoder')!r} embeddings, this encoder is {encoder.model_name!r}"
        )
    head: Head | HeadEnsemble = (
        HeadEnsemble(**meta["head"]) if "members" in meta["head"] else Head(**meta["head"])
    )
    head.load_state_dict(torch.load(folder / "head.pt", map_location="cpu", weights_only=True))
    # heads from before layer pooling was chosen were trained on e5's last-layer vectors
    pooled = encoder.pooled(int(meta.get("pool_layers", 1)))
    return HeadModel(pooled, head, Calibration.from_dict(meta["calibration"]), device)


_STAR_LABEL = re.compile(r"^\s*([1-5])\s*(star|stars|★)?\s*$", re.IGNORECASE)


def label_layout(id2label: dict[int, str]) -> tuple[str, list[int]]:
    """("stars", [star index per output]) or ("classes", [sentiment class per output])."""
    names = [str(id2label[i]) for i in sorted(id2label)]
    stars = [_STAR_LABEL.match(n) for n in names]
    if len(names) == 5 and all(stars):
        return "stars", [int(m.group(1)) - 1 for m in stars if m]
    classes = []
    for name in names:
        low = name.lower()
        if low.startswith("neg"):
            classes.append(0)
        elif low.startswith("neu"):
            classes.append(1)
        elif low.startswith("pos"):
            classes.append(2)
        else:
            break
    if len(classes) == 3 and sorted(classes) == [0, 1, 2]:
        return "classes", classes
    if len(names) == 3 and all(re.fullmatch(r"LABEL_\d", n) for n in names):
        return "classes", [0, 1, 2]  # unnamed labels: taken in negative, neutral, positive order
    if len(names) == 5 and all(re.fullmatch(r"LABEL_\d", n) for n in names):
        return "stars", [0, 1, 2, 3, 4]
    raise ValueError(f"labels {names} are neither negative/neutral/positive nor 1..5 stars")


class HFModel:
    """A fine-tuned transformers sequence-classification directory, on the runtime's device."""

    kind = "hf"

    def __init__(
        self, folder: Path, device: str = "cpu", max_tokens: int = 512, batch_size: int = 64
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
        self.model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_tokens
        model_max = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1_000_000 else limit
        self.max_tokens = int(min(max_tokens, limit, model_max))
        self.layout, self.order = label_layout({int(k): v for k, v in self.model.config.id2label.items()})
        cal_file = folder.parent / "calibration.json"
        self.calibration = (
            Calibration.from_dict(json.loads(cal_file.read_text())) if cal_file.exists() else Calibration()
        )
        self._lock = threading.Lock()

    def prepare(self, text: str) -> Prepared:
        text = clean(text)
        count = len(self.tokenizer(text, truncation=False)["input_ids"])
        return Prepared(text, count, count > self.max_tokens)

    def score(self, texts: Sequence[str]) -> Scores:
        outs = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    truncation=True,
                    max_length=self.max_tokens,
                    padding=True,
                    return_tensors="pt",
                ).to(self.device)
                outs.append(self.model(**enc).logits.float().cpu().numpy())
        logits = np.concatenate(outs).astype(np.float64)
        ordered = np.empty_like(logits)
        ordered[:, self.order] = logits  # outputs in star / class order
        if self.layout == "stars":
            return star_logits_to_scores(ordered, self.calibration)
        return class_logits_to_scores(ordered, self.calibration)


def load_version(
    folder: Path,
    manifest: Manifest,
    encoder: Callable[[], Encoder],
    device: str = "cpu",
    max_tokens: int = 512,
) -> SentimentModel:
    """The model-slot loader: either kind, checked by scoring one text before it is served."""
    kind = manifest.params.get("kind", "head")
    model: SentimentModel
    if kind == "head":
        model = load_head(folder, encoder(), device)
    elif kind == "finetuned":
        from .finetune import load_finetuned

        model = load_finetuned(folder, encoder(), device)
    elif kind == "hf":
        model = HFModel(folder / "hf", device, max_tokens)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    check = model.score([model.prepare("ok").text])
    if not np.all(np.isfinite(check.probs)):
        raise ValueError("model produces non-finite probabilities")
    return model


def import_hf_directory(
    store: ModelStore,
    source: Path,
    calibration: Calibration | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """Copy a fine-tuned HF sequence-classification directory into a new model-store version."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    layout, _ = label_layout({int(k): v for k, v in config.id2label.items()})
    with store.new_version(
        metrics=metrics, params={"kind": "hf", "labels": layout, "source": str(source)}
    ) as (
        folder,
        manifest,
    ):
        shutil.copytree(source, folder / "hf")
        if calibration is not None:
            (folder / "calibration.json").write_text(json.dumps(asdict(calibration)))
    return manifest.version
