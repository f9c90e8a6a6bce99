"""``cbec.vision.v1.VisionService`` on the shared runtime: visual product search over a FAISS index.

Uploads are decoded and resized in a thread pool (never on the event loop), embedded through the
runtime's micro-batcher (images from concurrent calls share one CNN batch), and searched in a worker
thread. The model slot holds an ``Engine`` (a model version with the index of its own embeddings), so
swapping versions re-indexes before the new version serves. Indexed products are committed to the
catalogue before ``IndexProducts`` answers, and are searchable on this replica by then.

The catalogue is the runtime's store ``vision`` (embedded SQLite, or the shared PostgreSQL for many
replicas). Every replica follows its change log: a commit anywhere notifies ``vision_catalogue`` and
each replica's ``CatalogueFollower`` syncs its index (``seq > last``), so a product indexed or removed
through any replica is searchable or gone on all of them within milliseconds. While the store is down,
IndexProducts and RemoveProducts fail with UNAVAILABLE and a retry delay; searches keep serving from
memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
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
    ServiceError,
    Violation,
    raise_if,
    rejection,
)
from services.runtime.model_store import Manifest, ModelSlot
from services.runtime.server import Runtime
from services.runtime.state import Database, StoreUnavailable

from . import images, model
from .catalogue import CHANNEL, Catalogue, CatalogueError, NewProduct
from .config import VisionSettings
from .engine import Engine, EngineOptions, Match
from .index import remove_snapshots, select_index_gpu

log = logging.getLogger("cbec.vision")
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
MAX_ID_LENGTH = 256
MAX_LABEL_LENGTH = 128
STORE = "vision"  # the runtime store holding the catalogue: <state dir>/vision.sqlite3 when embedded


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


class CatalogueFollower:
    """Keeps the serving engine(s) at the catalogue's head, in one background thread.

    Woken by the change feed (a notification from any replica carrying the new head, or ``None`` after
    the listener reconnected: catch up), and every ``check_s`` as a safety net. Each wake runs
    ``Engine.sync``, which reads ``seq > last`` through the log's primary key. A store that is down is
    retried with backoff; searches are unaffected (they never wait for a sync).
    """

    def __init__(
        self, engines: Callable[[], list[Engine]], check_s: float, on_synced: Callable[[Engine], None]
    ) -> None:
        self._engines = engines
        self.check_s = check_s
        self._on_synced = on_synced
        self._cond = threading.Condition()
        self._heard = 0  # highest head announced by a notification
        self._wanted = True
        self._stopped = False
        self._thread: threading.Thread | None = None

    def notify(self, payload: str | None) -> None:
        """The ``db.listen`` callback: cheap, never blocks on the store."""
        with self._cond:
            try:
                self._heard = max(self._heard, int(payload))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                self._wanted = True  # None (reconnected) or an unexpected payload: look
            self._cond.notify_all()

    def wake(self) -> None:
        self.notify(None)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vision-follower", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _behind(self) -> bool:
        return any(engine.seq < self._heard for engine in self._engines())

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                if backoff:
                    self._cond.wait_for(lambda: self._stopped, timeout=backoff)
                else:
                    self._cond.wait_for(
                        lambda: self._stopped or self._wanted or self._behind(), timeout=self.check_s
                    )
                if self._stopped:
                    return
                self._wanted = False
            backoff = 0.0 if self._sync_all() else min(max(backoff * 2, 0.2), 5.0)

    def _sync_all(self) -> bool:
        ok = True
        for engine in self._engines():
            try:
                engine.sync()
                self._on_synced(engine)
            except StoreUnavailable as exc:
                log.warning("catalogue sync deferred: %s", exc)
                ok = False
            except Exception:
                log.exception("catalogue sync failed")
                ok = False
        return ok


class VisionService(vision_pb2_grpc.VisionServiceServicer):
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        if not isinstance(settings, VisionSettings):
            settings = VisionSettings(**settings.model_dump())
        self.settings = settings
        self.runtime = runtime
        self.device = runtime.device
        torch.set_num_threads(settings.vision_torch_threads or max(1, len(os.sched_getaffinity(0)) - 1))
        self.gpu = select_index_gpu(
            runtime.device, settings.vision_index_gpu, explicit=settings.device.startswith("cuda")
        )
        self.limits = images.ImageLimits(settings.vision_max_image_bytes, settings.vision_max_image_pixels)
        self.index_dir = settings.index_cache_dir
        self.catalogue: Catalogue | None = None
        self._db: Database | None = None
        self.slot: ModelSlot[Engine] = runtime.model_slot(self._load)
        # An engine loaded but not yet swapped in: the follower keeps it in sync too, so writes that
        # land during a model swap are not missing from the new version's index.
        self._pending: Engine | None = None
        self.follower = CatalogueFollower(self._engines, settings.vision_sync_check_s, self._synced)
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

    def _open_catalogue(self) -> Catalogue:
        """The catalogue on the runtime's store (opened once, migrated, followed). A corrupt SQLite file
        raises CatalogueError and a store that is down StoreUnavailable: no version loads then."""
        if self.catalogue is None:
            if self._db is None:
                try:
                    self._db = self.runtime.database(STORE)
                except sqlite3.DatabaseError as exc:
                    raise CatalogueError(f"catalogue store {STORE} is unreadable: {exc}") from None
            self.catalogue = Catalogue(self._db)
            self._db.listen(CHANNEL, self.follower.notify)
            self.follower.start()
        return self.catalogue

    def _load(self, path: Path, manifest: Manifest) -> Engine:
        """Runs in a worker thread: load the version and open (or rebuild) its index. A corrupt
        catalogue raises, so no version loads and the service stays NOT_SERVING."""
        catalogue = self._open_catalogue()
        embedder = model.load(path, manifest.version, self.device.torch)
        engine = Engine.open(embedder, catalogue, self._options(), lambda _: self.m_rebuilds.inc())
        versions = {e.version for e in self.slot.store.versions()} | {manifest.version}
        catalogue.prune_embeddings(versions)
        remove_snapshots(self.index_dir, versions)
        self.m_size.set(engine.index.ntotal if engine.index else 0)
        self._pending = engine  # nothing can fail from here on: the slot swaps it in next
        self.follower.wake()
        return engine

    def _engines(self) -> list[Engine]:
        """The engines the follower keeps current: the serving one and one about to be swapped in."""
        current = self.slot.current
        engines = [current.model] if current is not None else []
        pending = self._pending
        if pending is not None:
            if engines and engines[0] is pending:
                self._pending = None
            else:
                engines.append(pending)
        return engines

    def _synced(self, engine: Engine) -> None:
        current = self.slot.current
        if current is not None and current.model is engine and engine.index is not None:
            self.m_size.set(engine.index.ntotal)

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
        await asyncio.to_thread(self.follower.stop)
        current = self.slot.current
        if current is not None:
            try:
                await asyncio.to_thread(current.model.snapshot)
            except OSError as exc:  # a cache: the next start replays the change log instead
                log.warning("index snapshot not saved: %s", exc)
        self._decoder.shutdown(wait=True)
        if self.catalogue is not None:
            self.catalogue.close()  # the runtime closes the store itself after this

    def register(self, server: grpc.aio.Server) -> None:
        vision_pb2_grpc.add_VisionServiceServicer_to_server(self, server)

    # --- helpers ---
    async def _prepare(self, data: bytes, size: int) -> images.Prepared:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, images.prepare, data, size, self.limits)

    def _image_error(self, exc: images.ImageError) -> ServiceError:
        """Too large is a per-request limit, so a client error naming the limit like any other bad
        upload (RESOURCE_EXHAUSTED is for load: a client that retries on it would resend forever)."""
        self.m_rejected.labels("too_large" if exc.too_large else "invalid").inc()
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
        """Bring the serving engine up to this replica's own write before answering, by the same
        ``Engine.sync`` the change feed drives (whichever runs first applies it; the other finds
        nothing new)."""
        engine = self.slot.require().model
        await asyncio.to_thread(engine.sync)
        self._synced(engine)
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
        # At most 1,000 ids of 1-256 characters: the contract (vision.proto), checked by the runtime.
        if not request.product_ids:
            raise InvalidArgument([Violation("product_ids", "is required: at least one product id")])
        ids = list(dict.fromkeys(request.product_ids))
        assert self.catalogue is not None
        removed, missing = await asyncio.to_thread(self.catalogue.remove, ids)
        await self._sync_current()
        return vision_pb2.RemoveProductsResponse(removed_count=len(removed), not_found_ids=missing)

    async def GetIndexStats(
        self, request: vision_pb2.GetIndexStatsRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.GetIndexStatsResponse:
        """From memory, like searches: the change feed keeps the index current."""
        engine = self.slot.require().model
        return await asyncio.to_thread(self._stats, engine)


def build(runtime: Runtime) -> VisionService:
    return VisionService(runtime)
