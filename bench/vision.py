"""Vision benchmark: retrieval quality on Fashion-MNIST, serving speed through gRPC, index at 1M vectors.

One run, measured side by side:
1. Quality. Index Fashion-MNIST training images 0..9,999, query with test images 0..1,999, relevance =
   same class. The fine-tuned model is trained exactly as ``python -m services.vision.train`` trains
   the default model (training images 10,000..17,999 for the head, 18,000..18,999 for validation:
   none of them indexed), so ``precision_at_10`` / ``map_at_10`` are the model the service serves by
   default; ``pretrained_*`` is the backbone embedding without the head, ``pixel_*`` raw pixels (L2).
   ``served_precision_at_10`` repeats the fine-tuned figure through the running gRPC service.
2. Serving. ``python -m services.vision`` in its own process with that model and the 10,000-product
   index; ``SearchByImage`` from 16 concurrent callers (closed loop, test images as queries):
   ``search_images_per_s``, p50/p99. ``raw_images_per_s``: the same model in this process embedding
   batches of 32 decoded images, nothing else (rounds alternate with the served ones, medians).
3. Index. 1M synthetic unit vectors at the served dimension (a mixture of 2,000 overlapping Gaussian
   clusters; queries are fresh draws, not indexed vectors), the service's exact index (Flat) vs its
   approximate one (IVF at the service's nprobe): single-query search p50/p99, recall@10 of
   approximate vs exact, build time, memory.

CNN features are cached by content hash (``data/vision/cache``), so a second run (or a run after
``make run``) skips the images already embedded; the JSON says how many were computed in this run.

    python -m bench.vision            # writes bench/results/vision.json and vision_*.png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import grpc
import numpy as np
import torch
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.progress import Progress

from bench.loadgen import RESULTS, LoadResult, closed_loop, write_results
from services.runtime.config import load_settings
from services.runtime.model_store import ModelStore
from services.vision import data, defaults, evaluate, features, model, train
from services.vision.config import VisionSettings
from services.vision.images import ImageLimits, decode
from services.vision.index import VectorIndex, index_type_for, nlist_for

ROOT = Path(__file__).resolve().parents[1]
INDEX_SIZE = 10_000
QUERY_SIZE = 2_000
# Synthetic index vectors: unit vectors around 2,000 Gaussian centres with per-dimension noise as large
# as the centres' own spread, so clusters overlap (well-separated clusters make any IVF look perfect).
NOISE = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 1. quality --------------------------------------------------------------------------------------
def quality(
    settings: VisionSettings,
    config: train.TrainConfig,
    index_size: int = INDEX_SIZE,
    query_size: int = QUERY_SIZE,
) -> dict[str, Any]:
    computed = {"n": 0}

    def count(n: int) -> None:
        computed["n"] += n

    data_dir = settings.vision_data_dir
    data.fetch(data_dir)
    started = time.monotonic()
    result, digest = train.fit_fashion(config, data_dir)
    train_s = time.monotonic() - started
    train_split, test_split = data.load("train", data_dir), data.load("test", data_dir)
    index_idx, query_idx = np.arange(index_size), np.arange(query_size)
    gallery_px, _ = train.pixels_of(train_split, index_idx, config.image_size, "index images")
    query_px, query_pngs = train.pixels_of(test_split, query_idx, config.image_size, "query images")
    cache = features.FeatureCache(data_dir / "cache", config.image_size)
    g_feats = features.extract(gallery_px, cache=cache, desc="CNN features (index)", on_batch=count)
    q_feats = features.extract(query_px, cache=cache, desc="CNN features (queries)", on_batch=count)
    cache.close()
    g_labels, q_labels = train_split.labels[index_idx], test_split.labels[query_idx]

    tuned = model.Embedder(
        model.ModelSpec("finetuned", config.image_size, config.dim, 1.0),
        result.trained_head,
        result.duplicates,
    )
    pre = model.Embedder(model.pretrained_spec(config.image_size, 1.0), None, result.duplicates)
    r_tuned = evaluate.retrieval(
        tuned.embed_features(q_feats), q_labels, tuned.embed_features(g_feats), g_labels
    )
    r_pre = evaluate.retrieval(pre.embed_features(q_feats), q_labels, pre.embed_features(g_feats), g_labels)
    pixels_g = train_split.images[index_idx].reshape(index_size, -1).astype(np.float32) / 255
    pixels_q = test_split.images[query_idx].reshape(query_size, -1).astype(np.float32) / 255
    r_pix = evaluate.retrieval(pixels_q, q_labels, pixels_g, g_labels, metric="l2")
    served = r_tuned if result.spec.kind == "finetuned" else r_pre

    # Per class, for the chart.
    per_class = {}
    for name, embedder in (("fine-tuned", tuned), ("pretrained", pre)):
        found = evaluate.top_k(embedder.embed_features(q_feats), embedder.embed_features(g_feats), 10)
        hits = g_labels[found] == q_labels[:, None]
        per_class[name] = [float(hits[q_labels == c].mean()) for c in range(10)]
    found = evaluate.top_k(pixels_q, pixels_g, 10, metric="l2")
    hits = g_labels[found] == q_labels[:, None]
    per_class["pixels"] = [float(hits[q_labels == c].mean()) for c in range(10)]

    default_store = ModelStore(settings.models_dir, "vision").newest_valid()
    same_as_default = None
    if default_store is not None and default_store.manifest is not None:
        same_as_default = default_store.manifest.data_fingerprint == digest and all(
            default_store.manifest.params.get(k) == v for k, v in result.params.items()
        )
        if same_as_default and result.head is not None:
            served_head = model.load(default_store.path, default_store.version).head
            same_as_default = served_head is not None and all(
                torch.equal(a, b)
                for a, b in zip(
                    served_head.state_dict().values(), result.head.state_dict().values(), strict=True
                )
            )
    ft, val = result.params["train_range"], result.params["val_range"]
    return {
        "result": result,
        "digest": digest,
        "query_pngs": query_pngs,
        "query_labels": q_labels,
        "gallery_labels": g_labels,
        "per_class": per_class,
        "json": {
            "protocol": (
                f"index Fashion-MNIST train[0:{index_size}], query test[0:{query_size}], relevance = same "
                f"class; fine-tune head on train[{ft[0]}:{ft[1]}], validation train[{val[0]}:{val[1]}] "
                f"(none indexed); input {config.image_size}px"
            ),
            "index_images": index_size,
            "query_images": query_size,
            "finetune_images": int(result.params["train_images"]),
            "validation_images": int(result.params["val_images"]),
            "served_kind": result.spec.kind,
            "precision_at_10": round(served.precision_at_k, 4),
            "map_at_10": round(served.map_at_k, 4),
            "finetuned_precision_at_10": round(r_tuned.precision_at_k, 4),
            "finetuned_map_at_10": round(r_tuned.map_at_k, 4),
            "pretrained_precision_at_10": round(r_pre.precision_at_k, 4),
            "pretrained_map_at_10": round(r_pre.map_at_k, 4),
            "pixel_precision_at_10": round(r_pix.precision_at_k, 4),
            "pixel_map_at_10": round(r_pix.map_at_k, 4),
            "precision_at_10_goal": 0.85,
            "query_class_counts": np.bincount(q_labels, minlength=10).tolist(),
            "cnn_images_computed_this_run": computed["n"],
            "train_seconds": round(train_s, 1),
            "same_model_as_models_dir_default": same_as_default,
            "near_duplicates": {
                k: round(v, 4) for k, v in result.metrics.items() if k.startswith("near_duplicate")
            },
        },
    }


# --- 2. serving --------------------------------------------------------------------------------------
def prepare_service(
    settings: VisionSettings, fit: train.FitResult, digest: str, work: Path, index_size: int
) -> VisionSettings:
    """A model store with the benchmark's model and a catalogue of the indexed images."""
    served = settings.model_copy(
        update={
            "models_dir": work / "models",
            "vision_index_dir": work / "index",
            "state_dir": work / "state",
        }
    )
    version = train.write_version(ModelStore(served.models_dir, "vision"), fit, digest)
    embedder = model.load(served.models_dir / "vision" / version, version)
    defaults.index_default_catalogue(served, embedder, index_size)
    defaults.build_index(served, embedder)
    return served


def start_server(served: VisionSettings, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CBEC_HOST": "127.0.0.1",
        "CBEC_GRPC_PORT": str(port),
        "CBEC_METRICS_PORT": "0",
        "CBEC_DEVICE": "cpu",
        "CBEC_LOG_LEVEL": "WARNING",
        "CBEC_MODELS_DIR": str(served.models_dir),
        "CBEC_VISION_INDEX_DIR": str(served.vision_index_dir),
        "CBEC_STATE_DIR": str(served.state_dir),
        "CBEC_VISION_DATA_DIR": str(served.vision_data_dir),
        "CBEC_BATCH_MAX_SIZE": "32",
    }
    return subprocess.Popen([sys.executable, "-m", "services.vision"], cwd=ROOT, env=env)


async def wait_serving(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError("vision service never reported SERVING")


async def served_quality(
    port: int, pngs: list[bytes], labels: np.ndarray, index_labels: dict[str, int]
) -> float:
    """Precision@10 of the 2,000 queries through gRPC (16 at a time)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        hits = np.zeros(len(pngs))
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with semaphore:
                reply = await stub.SearchByImage(
                    vision_pb2.SearchByImageRequest(image=pngs[i], k=10), timeout=120
                )
            hits[i] = np.mean([index_labels[m.product_id] == labels[i] for m in reply.matches])

        await asyncio.gather(*(one(i) for i in range(len(pngs))))
    return float(hits.mean())


async def load(port: int, pngs: list[bytes], seconds: float) -> LoadResult:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        requests = [vision_pb2.SearchByImageRequest(image=p, k=10) for p in pngs]
        return await closed_loop(
            lambda i: stub.SearchByImage(requests[i % len(requests)], timeout=60), 16, seconds, 2.0
        )


CPU_MS: dict[int, list[float]] = {}  # model CPU ms per image, by batch size


def raw_throughput(embedder: model.Embedder, pngs: list[bytes], seconds: float, batch: int = 32) -> float:
    """Images per second of the model alone: decoded inputs in batches, embedding + descriptor. Also
    records the CPU time per image (all threads), which the machine's other load does not inflate."""
    pixels = np.stack([decode(p, embedder.image_size, ImageLimits()) for p in pngs[: batch * 8]])
    embedder.embed_with_duplicates(pixels[:batch])  # warm-up
    done, started, cpu = 0, time.monotonic(), time.process_time()
    while time.monotonic() - started < seconds:
        start = done % (len(pixels) - batch + 1)
        embedder.embed_with_duplicates(pixels[start : start + batch])
        done += batch
    CPU_MS.setdefault(batch, []).append((time.process_time() - cpu) / done * 1000)
    return done / (time.monotonic() - started)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serving(
    settings: VisionSettings, q: dict[str, Any], rounds: int, seconds: float, work: Path
) -> dict[str, Any]:
    index_size = len(q["gallery_labels"])
    served = prepare_service(settings, q["result"], q["digest"], work, index_size)
    entry = ModelStore(served.models_dir, "vision").newest_valid()
    assert entry is not None
    embedder = model.load(entry.path, entry.version)
    index_labels = {data.product_id("train", i): int(q["gallery_labels"][i]) for i in range(index_size)}
    pngs = q["query_pngs"]
    raw: list[float] = []
    raw16: list[float] = []
    loads: list[LoadResult] = []
    served_p10 = None
    cpu_ms: dict[str, float] = {}
    with Progress() as progress:
        task = progress.add_task("serving: raw model vs gRPC at concurrency 16", total=rounds * 2 + 1)
        for r in range(rounds):
            raw.append(raw_throughput(embedder, pngs, seconds))
            raw16.append(raw_throughput(embedder, pngs, seconds / 2, batch=16))
            progress.advance(task)
            port = free_port()
            proc = start_server(served, port)
            try:
                asyncio.run(wait_serving(port))
                if r == 0:
                    server_cpu, client_cpu = process_cpu_s(proc.pid), time.process_time()
                    served_p10 = asyncio.run(served_quality(port, pngs, q["query_labels"], index_labels))
                    cpu_ms = {
                        "server_cpu_ms_per_search": (process_cpu_s(proc.pid) - server_cpu) / len(pngs) * 1000,
                        "client_cpu_ms_per_search": (time.process_time() - client_cpu) / len(pngs) * 1000,
                    }
                    progress.advance(task)
                loads.append(asyncio.run(load(port, pngs, seconds)))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            progress.advance(task)
    raw_ips = median(raw)
    search_ips = median(r.per_second for r in loads)
    # Each served round is paired with the raw round just before it: the machine's load drifts (other
    # work on the same cores), and the pair sees the same conditions.
    ratios = [r.per_second / x for r, x in zip(loads, raw, strict=True)]
    return {
        "protocol": (
            f"{rounds} alternating rounds of {seconds:g}s: the model alone in this process (batches of 32 "
            "decoded 64px images; also of 16, the most 16 callers can fill), then SearchByImage through "
            "python -m services.vision in its own process at concurrency 16 (closed loop, "
            f"{index_size:,}-product index, k=10, PNG uploads); medians; the ratio is the median of "
            "per-round ratios (served / raw of the same round); the load generator shares the 2 cores"
        ),
        "served_precision_at_10": round(served_p10, 4) if served_p10 is not None else None,
        "search_images_per_s": round(search_ips, 1),
        "search_p50_ms": round(median(r.percentile(50) for r in loads), 1),
        "search_p99_ms": round(median(r.percentile(99) for r in loads), 1),
        "raw_images_per_s": round(raw_ips, 1),
        "raw_images_per_s_batch_16": round(median(raw16), 1),
        "served_to_raw_ratio": round(median(ratios), 3),
        "served_to_raw_ratio_of_medians": round(search_ips / raw_ips, 3),
        "served_to_raw_batch_16_ratio": round(search_ips / median(raw16), 3),
        "served_to_raw_ratio_goal": 0.8,
        "cpu_accounting": {
            "what": (
                "CPU time, not wall time, so other work on the machine does not inflate it: the model "
                "alone per image (batches of 32, this process), the whole server per SearchByImage and "
                f"the load generator per call, over the {len(pngs):,} served queries"
            ),
            "model_cpu_ms_per_image": round(median(CPU_MS[32]), 2),
            **{k: round(v, 2) for k, v in cpu_ms.items()},
            "server_cpu_ms_per_search_beyond_model": round(
                cpu_ms["server_cpu_ms_per_search"] - median(CPU_MS[32]), 2
            ),
        },
        "rounds_raw_images_per_s": [round(x, 1) for x in raw],
        "rounds_search_images_per_s": [round(r.per_second, 1) for r in loads],
        "rounds_served_to_raw_ratio": [round(x, 3) for x in ratios],
        "errors": sum(r.errors for r in loads),
    }


# --- 3. index at 1M -----------------------------------------------------------------------------------
def synthetic(centres: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Unit vectors from a Gaussian mixture around ``centres``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        noise = rng.normal(size=(stop - start, centres.shape[1])).astype(np.float32)
        out[start:stop] = centres[rng.integers(0, len(centres), stop - start)] + NOISE * noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def index_scale(settings: VisionSettings, n: int, dim: int, queries: int) -> dict[str, Any]:
    centres = np.random.default_rng(0).normal(size=(2000, dim)).astype(np.float32)
    x = synthetic(centres, n, 1)
    q = synthetic(centres, queries, 2)  # fresh draws from the same mixture, not copies of indexed vectors
    ids = np.arange(n, dtype=np.int64)
    out: dict[str, Any] = {
        "vectors": n,
        "dimension": dim,
        "queries": queries,
        "service_index_type_at_this_size": index_type_for(n, settings.vision_exact_max),
    }
    results = {}
    for name, kind in (("exact", "Flat"), ("approximate", f"IVF{nlist_for(n)},Flat")):
        started = time.monotonic()
        index = VectorIndex.build(ids, x, dim, kind, settings.vision_ivf_nprobe)
        build_s = time.monotonic() - started
        latencies = []
        found = np.empty((queries, 10), dtype=np.int64)
        for i in range(queries):
            t0 = time.perf_counter()
            _, f = index.search(q[i : i + 1], 10)
            latencies.append((time.perf_counter() - t0) * 1000)
            found[i] = f[0]
        results[name] = found
        out[name] = {
            "index_type": kind,
            "nprobe": settings.vision_ivf_nprobe if kind.startswith("IVF") else None,
            "build_s": round(build_s, 1),
            "search_p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "search_p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "memory_mb": round(index.memory_bytes() / 2**20, 1),
        }
        del index
    recall = np.mean(
        [len(set(a) & set(e)) / 10 for a, e in zip(results["approximate"], results["exact"], strict=True)]
    )
    out["approximate_recall_at_10"] = round(float(recall), 4)
    out["approximate_recall_at_10_goal"] = 0.95
    out["process_max_rss_mb"] = round(rss_mb(), 1)
    return out


# --- charts -------------------------------------------------------------------------------------------
def charts(results: dict[str, Any], per_class: dict[str, list[float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qual = results["quality"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["pixels", "pretrained", "fine-tuned (served)"]
    p10 = [
        qual["pixel_precision_at_10"],
        qual["pretrained_precision_at_10"],
        qual["finetuned_precision_at_10"],
    ]
    m10 = [qual["pixel_map_at_10"], qual["pretrained_map_at_10"], qual["finetuned_map_at_10"]]
    pos = np.arange(3)
    a.bar(pos - 0.2, p10, 0.4, label="precision@10")
    a.bar(pos + 0.2, m10, 0.4, label="mAP@10")
    a.axhline(0.85, color="grey", linestyle="--", linewidth=1, label="goal 0.85")
    a.set_xticks(pos, names)
    a.set_ylim(0, 1)
    a.set_title(f"Fashion-MNIST: {qual['index_images']:,} indexed, {qual['query_images']:,} queries")
    a.legend(loc="lower right")
    for i, v in enumerate(p10):
        a.text(i - 0.2, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    width = 0.27
    for j, (name, values) in enumerate(per_class.items()):
        b.bar(np.arange(10) + (j - 1) * width, values, width, label=name)
    b.set_xticks(np.arange(10), data.CLASSES, rotation=45, ha="right")
    b.set_ylim(0, 1)
    b.set_title("precision@10 per class")
    b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    quality_png = RESULTS / "vision_quality.png"
    fig.savefig(quality_png, dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    serve = results["serving"]
    a.bar(
        ["model alone", "gRPC, c=16"],
        [serve["raw_images_per_s"], serve["search_images_per_s"]],
        color=["#888", "#37a"],
    )
    a.set_ylabel("images / s")
    a.set_title(f"search throughput (ratio {serve['served_to_raw_ratio']:.2f}, goal 0.8)")
    idx = results["index"]
    kinds = ["exact", "approximate"]
    b.bar(
        [f"{k}\n{idx[k]['index_type']}" for k in kinds],
        [idx[k]["search_p99_ms"] for k in kinds],
        color=["#888", "#3a7"],
    )
    b.set_ylabel("single-query p99 (ms)")
    b.set_title(f"{idx['vectors']:,} vectors: recall@10 {idx['approximate_recall_at_10']:.3f}")
    fig.tight_layout()
    speed_png = RESULTS / "vision_speed.png"
    fig.savefig(speed_png, dpi=110)
    plt.close(fig)
    return [quality_png.name, speed_png.name]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--index-vectors", type=int, default=1_000_000)
    parser.add_argument("--index-queries", type=int, default=300)
    parser.add_argument("--catalogue-images", type=int, default=INDEX_SIZE, help="smaller: a smoke run")
    parser.add_argument("--query-images", type=int, default=QUERY_SIZE, help="smaller: a smoke run")
    args = parser.parse_args()
    settings = load_settings(VisionSettings, "vision")
    started = time.monotonic()
    config = train.TrainConfig()
    q = quality(settings, config, args.catalogue_images, args.query_images)
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        serve = serving(settings, q, args.rounds, args.seconds, Path(tmp))
    index = index_scale(settings, args.index_vectors, config.dim, args.index_queries)
    results: dict[str, Any] = {"quality": q["json"], "serving": serve, "index": index}
    results["precision_at_10"] = q["json"]["precision_at_10"]
    results["map_at_10"] = q["json"]["map_at_10"]
    results["pretrained_precision_at_10"] = q["json"]["pretrained_precision_at_10"]
    results["pixel_precision_at_10"] = q["json"]["pixel_precision_at_10"]
    results["search_images_per_s"] = serve["search_images_per_s"]
    results["raw_images_per_s"] = serve["raw_images_per_s"]
    results["approximate_recall_at_10"] = index["approximate_recall_at_10"]
    results["charts"] = charts(results, q["per_class"])
    results["torch_threads"] = torch.get_num_threads()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started, 1)
    path = write_results("vision", results)
    print(path.read_text())


if __name__ == "__main__":
    main()
