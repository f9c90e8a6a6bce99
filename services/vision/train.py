"""Fine-tune the embedding for product retrieval and write a new model version to the model store.

Metric learning on frozen CNN features: the backbone runs once per image (features cached by content
hash), then a projection head is trained with a proxy loss (normalised softmax over one learned proxy
per class, Zhai & Wu 2019). The head is kept only if it retrieves better than the pretrained
embedding on held-out images; otherwise the version serves the pretrained embedding. A near-duplicate
threshold is calibrated on an instance descriptor (PCA of the backbone features): copies of an image
(re-encoded, cropped, tilted, relit) vs. each image's most similar distinct image.

Fashion-MNIST split (fixed, so the benchmark's index never overlaps training): training images
0..9,999 are the catalogue and never trained on; fine-tuning uses images from 10,000 on, then a
validation set after them.

    python -m services.vision.train                 # train and write a version
    python -m services.vision.train --if-missing    # only when the store has no valid version
    python -m services.vision.train --images DIR    # your own photos: DIR/<label>/*.jpg|png|webp
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from tqdm import tqdm

from services.runtime.config import load_settings
from services.runtime.model_store import ModelStore, fingerprint

from . import data, evaluate, features, model
from .config import VisionSettings
from .images import ImageLimits, decode

log = logging.getLogger("cbec.vision.train")

CATALOGUE_RESERVED = 10_000  # Fashion-MNIST training images kept for the index, never trained on
DEFAULT_IMAGE_SIZE = 64  # 28x28 originals: 64 px keeps the CNN at ~20 ms/image on 2 cores


@dataclass
class TrainConfig:
    image_size: int = DEFAULT_IMAGE_SIZE
    finetune_size: int = 8000
    val_size: int = 1000
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    hidden: int = 512
    dim: int = 128
    seed: int = 0
    calibration_size: int = 300
    duplicate_dim: int = 128
    val_every: int = 7  # --images: every 7th photo of a label is held out for validation


@dataclass
class FitResult:
    spec: model.ModelSpec
    head: model.ProjectionHead | None
    duplicates: model.DuplicateProjector
    metrics: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    trained_head: model.ProjectionHead | None = None  # kept for evaluation even when not served


def train_head(
    feats: np.ndarray, labels: np.ndarray, config: TrainConfig, progress: bool = True
) -> model.ProjectionHead:
    """Normalised-softmax proxy loss on frozen features; deterministic for a given seed."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    classes = np.unique(labels)
    targets = torch.from_numpy(np.searchsorted(classes, labels)).long()
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    head = model.ProjectionHead(feats.shape[1], config.hidden, config.dim)
    proxies = torch.nn.Parameter(torch.randn(len(classes), config.dim) * 0.1)
    params = [*head.parameters(), proxies]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, -(-len(x) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps)
    head.train()
    with tqdm(range(config.epochs), desc="fine-tune head", unit="epoch", disable=not progress) as bar:
        for _ in bar:
            order = rng.permutation(len(x))
            total = 0.0
            for start in range(0, len(x), config.batch_size):
                idx = torch.from_numpy(order[start : start + config.batch_size])
                if len(idx) < 2:
                    continue
                logits = head(x[idx]) @ F.normalize(proxies, dim=1).T / config.temperature
                loss = F.cross_entropy(logits, targets[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / len(x):.3f}")
    return head.eval()


def reupload(png: bytes, rng: np.random.Generator, size: int, strong: bool) -> bytes:
    """The same product picture again. Mild: re-encoded as JPEG at another size, cropped by up to 3%,
    relit by up to 5% (a re-upload or a screenshot). Strong: cropped by up to 12%, tilted by up to 6
    degrees, relit by up to 15% (photographed again)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((size * 2, size * 2), Image.Resampling.BICUBIC)
    w, h = image.size
    crop = rng.uniform(0.88 if strong else 0.97, 1.0)
    cw, ch = int(w * crop), int(h * crop)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((left, top, left + cw, top + ch))
    if strong:
        image = image.rotate(float(rng.uniform(-6, 6)), fillcolor=(0, 0, 0))
    light = 0.15 if strong else 0.05
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(1 - light, 1 + light)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(1 - light, 1 + light)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=int(rng.integers(60 if strong else 75, 95)))
    return out.getvalue()


def calibrate_near_duplicates(
    embedder: model.Embedder, pngs: list[bytes], others: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """Threshold on the duplicate descriptor between copies of an image (positives) and each image's
    most similar distinct image among ``others`` (negatives, descriptors): the 99th percentile of the
    negatives, so about 1% of distinct lookalikes are flagged. The share of mild and strong copies
    above it is reported."""
    rng = np.random.default_rng(seed)
    size = embedder.image_size
    limits = ImageLimits()
    originals = embedder.duplicates(
        embedder.backbone_features(np.stack([decode(p, size, limits) for p in pngs]))
    )
    sims = originals @ others.T
    sims[sims > 0.99999] = -1.0  # the original itself, when it is among ``others``
    negatives = sims.max(axis=1)
    threshold = float(np.quantile(negatives, 0.99))
    metrics = {
        "near_duplicate_threshold": threshold,
        "near_duplicate_fpr": float((negatives >= threshold).mean()),
    }
    for name, strong in (("reupload", False), ("rephotographed", True)):
        copies = np.stack([decode(reupload(p, rng, size, strong), size, limits) for p in pngs])
        positives = (originals * embedder.duplicates(embedder.backbone_features(copies))).sum(axis=1)
        metrics[f"near_duplicate_tpr_{name}"] = float((positives >= threshold).mean())
    return metrics


def fit(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    val_pngs: list[bytes],
    config: TrainConfig,
    device: str = "cpu",
    progress: bool = True,
) -> FitResult:
    """Train a head, compare it with the pretrained embedding on the validation images (leave-one-out
    retrieval), keep the better one, calibrate its near-duplicate threshold."""
    head = train_head(train_feats, train_labels, config, progress)
    duplicates = model.DuplicateProjector.fit(train_feats, config.duplicate_dim)
    k = min(10, len(val_labels) - 1)
    pre = model.Embedder(model.pretrained_spec(config.image_size, 1.0), None, duplicates, device=device)
    tuned = model.Embedder(
        model.ModelSpec("finetuned", config.image_size, config.dim, 1.0), head, duplicates, device=device
    )
    pre_val, tuned_val = pre.embed_features(val_feats), tuned.embed_features(val_feats)
    r_pre = evaluate.retrieval(pre_val, val_labels, pre_val, val_labels, k, exclude_self=True)
    r_tuned = evaluate.retrieval(tuned_val, val_labels, tuned_val, val_labels, k, exclude_self=True)
    use_head = r_tuned.precision_at_k > r_pre.precision_at_k
    chosen = tuned if use_head else pre
    log.info(
        "validation precision@%d: fine-tuned %.4f, pretrained %.4f -> serving %s",
        k,
        r_tuned.precision_at_k,
        r_pre.precision_at_k,
        "fine-tuned" if use_head else "pretrained",
    )
    calibration = calibrate_near_duplicates(
        chosen, val_pngs[: config.calibration_size], duplicates(val_feats), config.seed
    )
    chosen.spec.near_duplicate_threshold = calibration["near_duplicate_threshold"]
    metrics = {
        "val_precision_at_10": r_tuned.precision_at_k if use_head else r_pre.precision_at_k,
        "val_map_at_10": r_tuned.map_at_k if use_head else r_pre.map_at_k,
        "val_finetuned_precision_at_10": r_tuned.precision_at_k,
        "val_pretrained_precision_at_10": r_pre.precision_at_k,
        "val_finetuned_map_at_10": r_tuned.map_at_k,
        "val_pretrained_map_at_10": r_pre.map_at_k,
        **calibration,
    }
    params = {
        "kind": chosen.spec.kind,
        "image_size": config.image_size,
        "dim": chosen.spec.dim,
        "duplicate_dim": duplicates.dim,
        "train_images": len(train_labels),
        "val_images": len(val_labels),
        "epochs": config.epochs,
        "temperature": config.temperature,
        "seed": config.seed,
    }
    return FitResult(chosen.spec, head if use_head else None, duplicates, metrics, params, head)


def write_version(
    store: ModelStore, result: FitResult, data_fingerprint: str = "", extra: dict[str, Any] | None = None
) -> str:
    """Write the model files and manifest as a new version atomically; returns the version."""
    with store.new_version(
        metrics=result.metrics, data_fingerprint=data_fingerprint, params={**result.params, **(extra or {})}
    ) as (folder, manifest):
        model.save(folder, result.spec, result.head, result.duplicates)
    return manifest.version


def pixels_of(split: data.Split, indices: np.ndarray, size: int, desc: str) -> tuple[np.ndarray, list[bytes]]:
    """PNG-encode data-set images and decode them exactly as an upload is decoded."""
    limits = ImageLimits()
    pngs = [split.png(int(i)) for i in tqdm(indices, desc=f"{desc}: encode", unit="img", leave=False)]
    pixels = np.stack([decode(p, size, limits) for p in pngs])
    return pixels, pngs


def fashion_split(config: TrainConfig, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    start = CATALOGUE_RESERVED
    stop = start + config.finetune_size
    if stop + config.val_size > n_train:
        raise ValueError(f"fine-tune + validation images exceed the {n_train - start} available")
    return np.arange(start, stop), np.arange(stop, stop + config.val_size)


def fit_fashion(
    config: TrainConfig,
    data_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    fashion_mnist_dir: Path | None = None,
) -> tuple[FitResult, str]:
    """Fit on Fashion-MNIST training images that the catalogue never uses; returns (result, data hash)."""
    folder = data.locate(data_dir, fashion_mnist_dir)
    train = data.load("train", data_dir, fashion_mnist_dir)
    ft_idx, val_idx = fashion_split(config, len(train))
    cache = features.FeatureCache(Path(data_dir) / "cache", config.image_size)
    ft_pixels, _ = pixels_of(train, ft_idx, config.image_size, "fine-tune images")
    val_pixels, val_pngs = pixels_of(train, val_idx, config.image_size, "validation images")
    ft_feats = features.extract(
        ft_pixels, cache=cache, device=device, desc="CNN features (fine-tune)", progress=progress
    )
    val_feats = features.extract(
        val_pixels, cache=cache, device=device, desc="CNN features (validation)", progress=progress
    )
    cache.close()
    result = fit(
        ft_feats, train.labels[ft_idx], val_feats, train.labels[val_idx], val_pngs, config, device, progress
    )
    result.params["train_range"] = [int(ft_idx[0]), int(ft_idx[-1]) + 1]
    result.params["val_range"] = [int(val_idx[0]), int(val_idx[-1]) + 1]
    result.params["data"] = "fashion-mnist"
    files = [folder / name for pair in data.FILES.values() for name in pair]
    return result, fingerprint(*files)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def fit_folder(
    folder: Path, config: TrainConfig, cache_dir: Path, device: str = "cpu", progress: bool = True
) -> tuple[FitResult, str]:
    """Fit on your own labelled product photos: ``folder/<label>/<image>`` (JPEG, PNG or WebP). Every
    ``val_every``-th photo of each label (at least one) is held out for validation."""
    paths, labels, names = [], [], sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    for label, name in enumerate(names):
        files = sorted(f for f in (Path(folder) / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if len(names) < 2 or min(labels.count(i) for i in range(len(names))) < 2:
        raise ValueError(f"{folder}: need at least 2 labels (sub-folders) with at least 2 images each")
    limits = ImageLimits(max_bytes=1 << 30, max_pixels=200_000_000)
    blobs = [p.read_bytes() for p in tqdm(paths, desc="read images", unit="img", disable=not progress)]
    pixels = np.stack([decode(b, config.image_size, limits) for b in blobs])
    y = np.array(labels)
    rank = np.zeros(len(y), dtype=np.int64)
    for label in range(len(names)):
        members = np.flatnonzero(y == label)
        rank[members] = np.arange(len(members))
    val = rank % config.val_every == config.val_every - 1
    for label in range(len(names)):  # every label keeps one validation photo
        if not val[y == label].any():
            val[np.flatnonzero(y == label)[-1]] = True
    cache = features.FeatureCache(cache_dir, config.image_size)
    feats = features.extract(pixels, cache=cache, device=device, desc="CNN features", progress=progress)
    cache.close()
    val_blobs = [b for b, v in zip(blobs, val, strict=True) if v]
    result = fit(feats[~val], y[~val], feats[val], y[val], val_blobs, config, device, progress)
    result.params["data"] = str(folder)
    result.params["labels"] = names
    return result, fingerprint(*paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--if-missing", action="store_true", help="do nothing when a valid version exists")
    defaults = TrainConfig()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--finetune-size", type=int, default=defaults.finetune_size)
    parser.add_argument("--val-size", type=int, default=defaults.val_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--images",
        type=Path,
        help="train on your own labelled photos in IMAGES/<label>/*.jpg|png|webp instead of Fashion-MNIST",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings(VisionSettings, "vision")
    store = ModelStore(settings.models_dir, "vision")
    if args.if_missing and store.newest_valid() is not None:
        print(f"vision model present: {store.newest_valid().version}")  # type: ignore[union-attr]
        return 0
    if settings.vision_torch_threads:
        torch.set_num_threads(settings.vision_torch_threads)
    config = TrainConfig(
        image_size=args.image_size,
        finetune_size=args.finetune_size,
        val_size=args.val_size,
        epochs=args.epochs,
        seed=args.seed,
    )
    if args.images is not None:
        result, digest = fit_folder(args.images, config, settings.vision_data_dir / "cache")
    else:
        data.fetch(settings.vision_data_dir, settings.vision_fashion_mnist_dir)
        result, digest = fit_fashion(
            config, settings.vision_data_dir, fashion_mnist_dir=settings.vision_fashion_mnist_dir
        )
    version = write_version(store, result, digest)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()))
    print(f"wrote vision model {version} ({result.spec.kind}): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
