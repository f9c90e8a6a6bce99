"""``cbec.vision.v1.VisionService`` on the shared runtime: visual product search over a FAISS index.

Uploads are decoded and resized in a thread pool (never on the event loop), embedded through the
runtime's micro-batcher (images from concurrent calls share one CNN batch), and searched in a worker
thread. The model slot holds an ``Engine`` (a model version with the index of its own embeddings), so
swapping versions re-indexes before the new version serves. Indexed products are committed to the
catalogue before ``IndexProducts`` answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from cbec.common.v1 import common_pb2
from cbec.vision.v1 import vision_pb2, vision_pb2_grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Gauge

from services.runtime.admin import model_info
from services.runtime.errors import (
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Violation,
    raise_if,
    rejection,
)
from services.runtime.model_store import Manifest, ModelSlot
from services.runtime.server import Runtime

from . import images, model
from .catalogue import Catalogue, NewProduct
from .config import VisionSettings
from .engine import Engine, EngineOptions, Match
from .index import remove_snapshots, select_index_gpu

log = logging.getLogger("cbec.vision")
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
MAX_ID_LENGTH = 256
MAX_LABEL_LENGTH = 128
CATALOGUE_FILE = "catalogue.sqlite"


@dataclass(frozen=True)
class _Accepted:
    product: NewProduct


@dataclass(frozen=True)
class _Search:
    engine: Engine
    k: int
    category: str
    market: str
    sha256: str


@dataclass(frozen=True)
class _Job:
    """One image for the micro-batcher: embed it, and search the index with it when ``search`` is set."""

    embedder: model.Embedder
    pixels: np.ndarray
    search: _Search | None = None


@dataclass
class _Done:
    vector: np.ndarray
    duplicate: np.ndarray
    matches: list[Match] | None = None


def _text_violations(
    prefix: str, request: Any, required: Sequence[str], optional: Sequence[str]
) -> list[Violation]:
    out = []
    for name in required:
        value = getattr(request, name)
        if not value.strip():
            out.append(Violation(prefix + name, "is required"))
        elif len(value) > MAX_ID_LENGTH:
            out.append(Violation(prefix + name, f"must be at most {MAX_ID_LENGTH} characters"))
    for name in optional:
        if len(getattr(request, name)) > MAX_LABEL_LENGTH:
            out.append(Violation(prefix + name, f"must be at most {MAX_LABEL_LENGTH} characters"))
    return out


class VisionService(vision_pb2_grpc.VisionServiceServicer):
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        if not isinstance(settings, VisionSettings):
            settings = VisionSettings(**settings.model_dump())
        self.settings = settings
        self.device = runtime.device
        torch.set_num_threads(settings.vision_torch_threads or max(1, len(os.sched_getaffinity(0)) - 1))
        self.gpu = select_index_gpu(
            runtime.device, settings.vision_index_gpu, explicit=settings.device.startswith("cuda")
        )
        self.limits = images.ImageLimits(settings.vision_max_image_bytes, settings.vision_max_image_pixels)
        self.index_dir = Path(settings.vision_index_dir)
        self.catalogue: Catalogue | None = None
        self.slot: ModelSlot[Engine] = runtime.model_slot(self._load)
        self.batcher = runtime.batcher(
            self._run_batch, "vision", concurrency=settings.vision_inference_streams
        )
        self._decoder = ThreadPoolExecutor(settings.vision_decode_threads, thread_name_prefix="vision-decode")
        registry = runtime.metrics.registry
        self.m_size = Gauge("vision_index_size", "Products in the serving index.", registry=registry)
        self.m_rejected = Counter(
            "vision_images_rejected",
            "Uploads refused before embedding, by reason.",
            ("reason",),
            registry=registry,
        )
        self.m_rebuilds = Counter(
            "vision_index_rebuilds",
            "Indexes rebuilt from the catalogue instead of loaded.",
            registry=registry,
        )

    # --- model slot ---
    def _options(self) -> EngineOptions:
        s = self.settings
        return EngineOptions(
            index_dir=self.index_dir,
            exact_max=s.vision_exact_max,
            nprobe=s.vision_ivf_nprobe,
            gpu=self.gpu,
            snapshot_every=s.vision_snapshot_every,
            near_duplicate_threshold=s.vision_near_duplicate_threshold,
        )

    def _load(self, path: Path, manifest: Manifest) -> Engine:
        """Runs in a worker thread: load the version and open (or rebuild) its index. A corrupt
        catalogue raises, so no version loads and the service stays NOT_SERVING."""
        if self.catalogue is None:
            self.catalogue = Catalogue(self.index_dir / CATALOGUE_FILE)
        embedder = model.load(path, manifest.version, self.device.torch)
        engine = Engine.open(embedder, self.catalogue, self._options(), lambda _: self.m_rebuilds.inc())
        versions = {e.version for e in self.slot.store.versions()} | {manifest.version}
        self.catalogue.prune_embeddings(versions)
        remove_snapshots(self.index_dir, versions)
        self.m_size.set(engine.index.ntotal if engine.index else 0)
        return engine

    def _run_batch(self, jobs: list[_Job]) -> list[_Done]:
        """Batcher function: one CNN call per model version in the batch (normally one), then one index
        search per engine and filter combination for the jobs that search."""
        done: list[_Done | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.embedder), []).append(i)
        for members in groups.values():
            embedder = jobs[members[0]].embedder
            vectors, duplicates = embedder.embed_with_duplicates(np.stack([jobs[i].pixels for i in members]))
            for i, vector, duplicate in zip(members, vectors, duplicates, strict=True):
                done[i] = _Done(vector, duplicate)
        searches: dict[tuple[int, str, str], list[int]] = {}
        for i, job in enumerate(jobs):
            if job.search is not None:
                key = (id(job.search.engine), job.search.category, job.search.market)
                searches.setdefault(key, []).append(i)
        for members in searches.values():
            first = jobs[members[0]].search
            assert first is not None
            k = max(jobs[i].search.k for i in members)  # type: ignore[union-attr]
            found = first.engine.search_many(
                np.stack([done[i].vector for i in members]),  # type: ignore[union-attr]
                k,
                first.category,
                first.market,
                [jobs[i].search.sha256 for i in members],  # type: ignore[union-attr]
                np.stack([done[i].duplicate for i in members]),  # type: ignore[union-attr]
            )
            for i, matches in zip(members, found, strict=True):
                done[i].matches = matches[: jobs[i].search.k]  # type: ignore[union-attr]
        return done  # type: ignore[return-value]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        current = self.slot.current
        if current is not None:
            await asyncio.to_thread(current.model.snapshot)
        self._decoder.shutdown(wait=True)
        if self.catalogue is not None:
            self.catalogue.close()

    def register(self, server: grpc.aio.Server) -> None:
        vision_pb2_grpc.add_VisionServiceServicer_to_server(self, server)

    # --- helpers ---
    async def _prepare(self, data: bytes, size: int) -> images.Prepared:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, images.prepare, data, size, self.limits)

    def _image_error(self, exc: images.ImageError) -> ServiceError:
        self.m_rejected.labels("too_large" if exc.too_large else "invalid").inc()
        if exc.too_large:
            return ResourceExhausted(f"image: {exc.reason}")
        return InvalidArgument([Violation("image", exc.reason)])

    def _stats(self, engine: Engine) -> vision_pb2.GetIndexStatsResponse:
        stats = engine.stats()
        built = timestamp_pb2.Timestamp()
        built.FromDatetime(datetime.fromtimestamp(float(stats["built_time"]), UTC))  # type: ignore[arg-type]
        return vision_pb2.GetIndexStatsResponse(
            size=int(stats["size"]),  # type: ignore[call-overload]
            model_version=str(stats["model_version"]),
            index_type=str(stats["index_type"]),
            dimension=int(stats["dimension"]),  # type: ignore[call-overload]
            on_gpu=bool(stats["on_gpu"]),
            built_time=built,
        )

    async def _sync_current(self) -> Engine:
        engine = self.slot.require().model
        await asyncio.to_thread(engine.sync)
        self.m_size.set(engine.index.ntotal if engine.index else 0)
        return engine

    # --- methods ---
    async def SearchByImage(
        self, request: vision_pb2.SearchByImageRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.SearchByImageResponse:
        loaded = self.slot.require()
        engine = loaded.model
        s = self.settings
        violations = _text_violations("", request, (), ("category", "market"))
        if request.k < 0:
            violations.append(Violation("k", "must be >= 0 (0 = the default)"))
        elif request.k > s.vision_max_k:
            violations.append(Violation("k", f"must be at most {s.vision_max_k}"))
        raise_if(violations)
        try:
            prepared = await self._prepare(request.image, engine.embedder.image_size)
        except images.ImageError as exc:
            raise self._image_error(exc) from None
        k = request.k or s.vision_default_k
        search = _Search(engine, k, request.category, request.market, prepared.sha256)
        done = await self.batcher.submit(
            _Job(engine.embedder, prepared.pixels, search), time_remaining=context.time_remaining()
        )
        matches = done.matches or []
        return vision_pb2.SearchByImageResponse(
            matches=[
                vision_pb2.VisualMatch(
                    product_id=m.product_id,
                    score=m.score,
                    category=m.category,
                    market=m.market,
                    near_duplicate=m.near_duplicate,
                )
                for m in matches
            ],
            model=model_info(loaded.manifest),
        )

    async def _accept(
        self, position: int, request: vision_pb2.IndexProductsRequest, embedder: model.Embedder, context: Any
    ) -> _Accepted | common_pb2.ItemRejection:
        violations = _text_violations("", request, ("product_id",), ("category", "market"))
        if not violations:
            try:
                prepared = await self._prepare(request.image, embedder.image_size)
            except images.ImageError as exc:
                self.m_rejected.labels("too_large" if exc.too_large else "invalid").inc()
                violations.append(Violation("image", exc.reason))
        if violations:
            return rejection(position, violations)
        job = _Job(embedder, prepared.pixels)
        done = await self.batcher.submit(job, time_remaining=context.time_remaining())
        product = NewProduct(
            request.product_id,
            request.category,
            request.market,
            prepared.sha256,
            request.image,
            done.vector,
            done.duplicate,
        )
        return _Accepted(product)

    async def IndexProducts(
        self,
        request_iterator: AsyncIterator[vision_pb2.IndexProductsRequest],
        context: grpc.aio.ServicerContext,
    ) -> vision_pb2.IndexProductsResponse:
        loaded = self.slot.require()
        embedder = loaded.model.embedder
        chunk_size = self.settings.vision_index_concurrency
        indexed = 0
        seen = 0
        rejected: list[common_pb2.ItemRejection] = []
        chunk: list[tuple[int, vision_pb2.IndexProductsRequest]] = []

        async def commit() -> None:
            nonlocal indexed
            results = await asyncio.gather(*(self._accept(i, r, embedder, context) for i, r in chunk))
            chunk.clear()
            accepted = [r.product for r in results if isinstance(r, _Accepted)]
            rejected.extend(r for r in results if isinstance(r, common_pb2.ItemRejection))
            if accepted:
                assert self.catalogue is not None
                await asyncio.to_thread(self.catalogue.upsert, accepted, embedder.version)
                indexed += len(accepted)
                await self._sync_current()

        async for request in request_iterator:
            chunk.append((seen, request))
            seen += 1
            if len(chunk) >= chunk_size:
                await commit()
        if seen == 0:
            raise InvalidArgument([Violation("requests", "the stream carried no products")])
        if chunk:
            await commit()
        engine = await self._sync_current()
        stats = await asyncio.to_thread(self._stats, engine)
        return vision_pb2.IndexProductsResponse(indexed_count=indexed, rejected=rejected, stats=stats)

    async def RemoveProducts(
        self, request: vision_pb2.RemoveProductsRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.RemoveProductsResponse:
        self.slot.require()
        violations = []
        if not request.product_ids:
            violations.append(Violation("product_ids", "is required: at least one product id"))
        for i, pid in enumerate(request.product_ids):
            if not pid.strip():
                violations.append(Violation(f"product_ids[{i}]", "must not be empty"))
            elif len(pid) > MAX_ID_LENGTH:
                violations.append(
                    Violation(f"product_ids[{i}]", f"must be at most {MAX_ID_LENGTH} characters")
                )
        raise_if(violations)
        ids = list(dict.fromkeys(request.product_ids))
        assert self.catalogue is not None
        removed, missing = await asyncio.to_thread(self.catalogue.remove, ids)
        await self._sync_current()
        return vision_pb2.RemoveProductsResponse(removed_count=len(removed), not_found_ids=missing)

    async def GetIndexStats(
        self, request: vision_pb2.GetIndexStatsRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.GetIndexStatsResponse:
        engine = await self._sync_current()
        return await asyncio.to_thread(self._stats, engine)


def build(runtime: Runtime) -> VisionService:
    return VisionService(runtime)
