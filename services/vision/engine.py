"""One model version together with the index of that version's embeddings of the catalogue.

The service's model slot holds an ``Engine``: swapping model versions swaps the embedder and its
index together, so a query is never embedded by one version and searched against another's vectors.
An engine opens its version's snapshot when one is there and valid, rebuilds from the catalogue when
not (embedding products that have no vector of this version yet), then replays catalogue changes made
after the snapshot and checks that the index holds exactly the catalogue's products.

Afterwards ``sync`` follows the catalogue's change log (``seq > last``), whoever wrote the change: this
replica's own IndexProducts and every other replica's writes take the same path. It reads the store
and embeds without holding the search lock, so searches keep serving from memory (index, metadata and
near-duplicate descriptors) while the store is slow or down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .catalogue import Catalogue, Change, Product
from .features import FeatureCache, extract
from .images import ImageError, ImageLimits, decode
from .index import SnapshotError, VectorIndex, index_type_for, load_snapshot, save_snapshot
from .model import Embedder

log = logging.getLogger("cbec.vision.engine")


@dataclass(frozen=True)
class EngineOptions:
    index_dir: Path
    exact_max: int = 200_000
    nprobe: int = 64
    gpu: int | None = None
    snapshot_every: int = 1000
    near_duplicate_threshold: float | None = None
    embed_batch: int = 64
    progress: bool = False
    # Offline tools (defaults, benchmark) re-use backbone features by content hash; the server does not
    # keep uploads' features.
    feature_cache: FeatureCache | None = None


@dataclass
class _Built:
    """An index built from the catalogue, ready to be installed."""

    index: VectorIndex
    products: list[Product]
    duplicates: dict[int, np.ndarray]
    seq: int
    token: str


@dataclass(frozen=True)
class Match:
    product_id: str
    score: float
    category: str
    market: str
    near_duplicate: bool


class Engine:
    def __init__(self, embedder: Embedder, catalogue: Catalogue, options: EngineOptions) -> None:
        self.embedder = embedder
        self.catalogue = catalogue
        self.options = options
        self.version = embedder.version
        self.index: VectorIndex | None = None
        self.seq = 0
        self.token = ""  # the catalogue's token of change ``seq`` (recorded in snapshots)
        self._snapshot_seq = -1
        self._products: dict[int, Product] = {}
        self._dups: dict[int, np.ndarray] = {}  # near-duplicate descriptors, in memory for searches
        self._by_category: dict[str, set[int]] = {}
        self._by_market: dict[str, set[int]] = {}
        self._by_sha: dict[str, set[int]] = {}
        self._lock = threading.RLock()  # the in-memory state searches read
        self._sync_lock = threading.RLock()  # one writer of that state at a time (open, sync, snapshot)
        self.rebuild_reason = ""
        self.embedded = 0  # catalogue images this engine had to embed (not found stored)
        self.skipped: list[tuple[str, str]] = []  # (product_id, why) that could not be embedded
        self.on_rebuild: Callable[[str], None] | None = None

    @property
    def threshold(self) -> float:
        override = self.options.near_duplicate_threshold
        return override if override is not None else self.embedder.spec.near_duplicate_threshold

    # --- opening ---
    @classmethod
    def open(
        cls,
        embedder: Embedder,
        catalogue: Catalogue,
        options: EngineOptions,
        on_rebuild: Callable[[str], None] | None = None,
    ) -> Engine:
        """Snapshot if valid, else rebuild; then catch up and verify. Raises CatalogueError when the
        catalogue itself is damaged (the service then refuses to serve)."""
        catalogue.check()
        engine = cls(embedder, catalogue, options)
        engine.on_rebuild = on_rebuild
        with engine._sync_lock:
            try:
                index, meta = load_snapshot(
                    options.index_dir, engine.version, embedder.dim, options.nprobe, options.gpu
                )
            except SnapshotError as exc:
                engine._rebuild(str(exc))
            else:
                engine.index, engine.seq, engine._snapshot_seq = index, meta.seq, meta.seq
                engine.token = meta.token
                head, products = catalogue.state()
                if meta.catalogue_id != catalogue.id:
                    engine._rebuild("index snapshot was built from another catalogue")
                elif meta.seq > head:
                    engine._rebuild(f"index snapshot is ahead of the catalogue ({meta.seq} > {head})")
                elif catalogue.token_at(meta.seq) != meta.token:
                    engine._rebuild(
                        f"catalogue history differs from the index snapshot's at change {meta.seq}"
                    )
                else:
                    engine._set_products(products, drop_after=meta.seq)
                    engine.sync()
                    problem = engine._verify()
                    if problem:
                        engine._rebuild(f"index snapshot disagrees with the catalogue: {problem}")
            engine.snapshot(force=engine._snapshot_seq != engine.seq)
        return engine

    def _set_products(self, products: list[Product], drop_after: int | None = None) -> None:
        """Load product metadata; with ``drop_after``, leave out rows added after that change (the
        replay adds them back)."""
        added_later: set[int] = set()
        if drop_after is not None:
            added_later = {c.row_id for c in self.catalogue.changes_since(drop_after) if c.op == "add"}
        self._products, self._by_category, self._by_market, self._by_sha = {}, {}, {}, {}
        for product in products:
            if product.row_id not in added_later:
                self._remember(product)
        self._dups = self.catalogue.duplicates(
            self.version, list(self._products), self.embedder.duplicates.dim
        )
        # Rows removed after the snapshot are gone from the catalogue but still in the index: the
        # replay removes them from the index; they need no metadata.

    def _remember(self, product: Product) -> None:
        self._products[product.row_id] = product
        self._by_category.setdefault(product.category, set()).add(product.row_id)
        self._by_market.setdefault(product.market, set()).add(product.row_id)
        self._by_sha.setdefault(product.sha256, set()).add(product.row_id)

    def _forget(self, row_id: int) -> None:
        self._dups.pop(row_id, None)
        product = self._products.pop(row_id, None)
        if product is None:
            return
        for table, key in (
            (self._by_category, product.category),
            (self._by_market, product.market),
            (self._by_sha, product.sha256),
        ):
            members = table.get(key)
            if members is not None:
                members.discard(row_id)
                if not members:
                    del table[key]

    def _rebuild(self, reason: str) -> None:
        """Build this version's index from the catalogue, embedding what has no vector of it yet."""
        self._install(self._build(reason))

    def _build(self, reason: str) -> _Built:
        """Read and embed without the search lock (searches go on with the old index meanwhile)."""
        log.warning("rebuilding the index for model %s: %s", self.version, reason)
        self.rebuild_reason = reason
        if self.on_rebuild is not None:
            self.on_rebuild(reason)
        head, products = self.catalogue.state()
        token = self.catalogue.token_at(head) or ""
        row_ids = [p.row_id for p in products]
        vectors, dups = self._vectors_for(row_ids)
        kept = [p for p in products if p.row_id in vectors]
        ids = np.array([p.row_id for p in kept], dtype=np.int64)
        x = (
            np.stack([vectors[p.row_id] for p in kept])
            if kept
            else np.zeros((0, self.embedder.dim), np.float32)
        )
        index = VectorIndex.build(
            ids,
            x,
            self.embedder.dim,
            index_type_for(len(ids), self.options.exact_max),
            self.options.nprobe,
            self.options.gpu,
        )
        return _Built(index, kept, {p.row_id: dups[p.row_id] for p in kept}, head, token)

    def _install(self, built: _Built) -> None:
        with self._lock:
            self.index = built.index
            self._products, self._by_category, self._by_market, self._by_sha = {}, {}, {}, {}
            for product in built.products:
                self._remember(product)
            self._dups = built.duplicates
            self.seq, self.token = built.seq, built.token
            self._snapshot_seq = -1

    def _vectors_for(self, row_ids: list[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """This version's (embeddings, near-duplicate descriptors) of the rows: stored ones (written by
        whichever replica indexed the product), plus the rest embedded from the stored images (and
        stored, so no replica or later rebuild embeds them again)."""
        stored = self.catalogue.embeddings_and_duplicates(
            self.version, row_ids, self.embedder.dim, self.embedder.duplicates.dim
        )
        found = {r: v for r, (v, _) in stored.items()}
        descriptors = {r: d for r, (_, d) in stored.items()}
        missing = [r for r in row_ids if r not in found]
        if not missing:
            return found, descriptors
        log.info("embedding %d catalogue images with model %s", len(missing), self.version)
        size, limits = self.embedder.image_size, ImageLimits(max_bytes=1 << 62, max_pixels=1 << 62)
        batch_ids: list[int] = []
        batch_pixels: list[np.ndarray] = []
        products = {p.row_id: p for p in self.catalogue.products(missing)}

        def flush() -> None:
            if batch_ids:
                pixels = np.stack(batch_pixels)
                if self.options.feature_cache is not None:
                    feats = extract(
                        pixels,
                        self.embedder.backbone,
                        self.options.feature_cache,
                        device=self.embedder.device,
                        progress=False,
                    )
                else:
                    feats = self.embedder.backbone_features(pixels)
                vecs, dups = self.embedder.embed_features(feats), self.embedder.duplicates(feats)
                self.catalogue.put_embeddings(self.version, list(zip(batch_ids, vecs, dups, strict=True)))
                found.update(zip(batch_ids, vecs, strict=True))
                descriptors.update(zip(batch_ids, np.asarray(dups, dtype=np.float32), strict=True))
                self.embedded += len(batch_ids)
                batch_ids.clear()
                batch_pixels.clear()

        with tqdm(
            total=len(missing),
            desc=f"embed catalogue ({self.version})",
            unit="img",
            disable=not self.options.progress,
        ) as bar:
            for row_id, blob in self.catalogue.images(missing):
                try:
                    batch_pixels.append(decode(blob, size, limits))
                    batch_ids.append(row_id)
                except ImageError as exc:  # was valid when accepted; a later Pillow may disagree
                    pid = products[row_id].product_id if row_id in products else str(row_id)
                    self.skipped.append((pid, exc.reason))
                    log.error("catalogue image of %s cannot be decoded: %s", pid, exc.reason)
                if len(batch_ids) >= self.options.embed_batch:
                    flush()
                bar.update(1)
            flush()
        return found, descriptors

    def _verify(self) -> str:
        """'' when the index holds exactly the known products, else what differs."""
        assert self.index is not None
        in_index = np.sort(self.index.ids())
        expected = np.sort(np.fromiter(self._products.keys(), dtype=np.int64, count=len(self._products)))
        if in_index.shape == expected.shape and np.array_equal(in_index, expected):
            return ""
        extra = np.setdiff1d(in_index, expected)
        lacking = np.setdiff1d(expected, in_index)
        return f"{len(extra)} unknown ids in the index, {len(lacking)} products missing from it"

    # --- keeping up with the catalogue ---
    def sync(self) -> int:
        """Apply catalogue changes made since this engine last looked (by this replica or any other);
        returns how many. Raises StoreUnavailable while the store is down, leaving the engine as it was.

        Reads and embeds outside the search lock; only applying the result takes it."""
        with self._sync_lock:
            changes = self.catalogue.changes_since(self.seq)
            if not changes:
                return 0
            assert self.index is not None
            added, removed = _net(changes)
            products = self.catalogue.products(list(added)) if added else []
            vectors, dups = self._vectors_for([p.row_id for p in products])
            kept = [p for p in products if p.row_id in vectors]
            with self._lock:
                if removed:
                    self.index.remove(sorted(removed))
                    for row_id in removed:
                        self._forget(row_id)
                if kept:
                    self.index.add([p.row_id for p in kept], np.stack([vectors[p.row_id] for p in kept]))
                    for product in kept:
                        self._remember(product)
                        self._dups[product.row_id] = dups[product.row_id]
                self.seq, self.token = changes[-1].seq, changes[-1].token
            n, limit = self.index.ntotal, self.options.exact_max
            if (n > limit and not self.index.is_ivf) or (self.index.is_ivf and n < limit // 2):
                self._rebuild(f"catalogue size {n} calls for a {index_type_for(n, limit)} index")
            if self.seq - max(self._snapshot_seq, 0) >= self.options.snapshot_every:
                self.snapshot(force=True)
            return len(changes)

    def snapshot(self, force: bool = False) -> None:
        """Save the index to the local cache folder; needs no store (the token of ``seq`` is known)."""
        with self._sync_lock:
            if self.index is None or (not force and self._snapshot_seq == self.seq):
                return
            started = time.monotonic()
            save_snapshot(
                self.options.index_dir, self.version, self.index, self.seq, self.catalogue.id, self.token
            )
            self._snapshot_seq = self.seq
            log.info(
                "index snapshot saved",
                extra={
                    "version": self.version,
                    "size": self.index.ntotal,
                    "seconds": time.monotonic() - started,
                },
            )

    # --- queries ---
    def search(
        self,
        vector: np.ndarray,
        k: int,
        category: str = "",
        market: str = "",
        sha256: str = "",
        duplicate: np.ndarray | None = None,
    ) -> list[Match]:
        """Top-k products; a match is a near-duplicate when its bytes are the query's, or its duplicate
        descriptor is within the model's calibrated threshold of the query's (``duplicate``)."""
        dups = None if duplicate is None else duplicate.reshape(1, -1)
        return self.search_many(vector.reshape(1, -1), k, category, market, [sha256], dups)[0]

    def search_many(
        self,
        vectors: np.ndarray,
        k: int,
        category: str = "",
        market: str = "",
        sha256s: list[str] | None = None,
        duplicates: np.ndarray | None = None,
    ) -> list[list[Match]]:
        """``search`` for a batch of queries with the same filters: one FAISS call, no store read."""
        with self._lock:  # served from memory: no store read (the change feed keeps it current)
            assert self.index is not None
            n = len(vectors)
            allowed = None
            if category or market:
                sets = []
                if category:
                    sets.append(self._by_category.get(category, set()))
                if market:  # the market's products and those sold everywhere (market "")
                    sets.append(self._by_market.get(market, set()) | self._by_market.get("", set()))
                candidates = set.intersection(*sets) if len(sets) > 1 else sets[0]
                allowed = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
                if not len(allowed):
                    return [[] for _ in range(n)]
            scores, ids = self.index.search(vectors, k, allowed)
            threshold = self.threshold
            stored = self._dups if duplicates is not None else {}
            results = []
            for q in range(n):
                sha = sha256s[q] if sha256s else ""
                same_bytes = self._by_sha.get(sha, set()) if sha else set()
                matches = []
                for score, row_id in zip(scores[q], ids[q], strict=True):
                    product = self._products.get(int(row_id))
                    if row_id < 0 or product is None:
                        continue
                    stored_dup = stored.get(int(row_id))
                    similar = (
                        duplicates is not None
                        and stored_dup is not None
                        and float((stored_dup * duplicates[q]).sum()) >= threshold
                    )
                    matches.append(
                        Match(
                            product.product_id,
                            float(np.clip(score, -1.0, 1.0)),
                            product.category,
                            product.market,
                            bool(row_id in same_bytes or similar),
                        )
                    )
                results.append(matches)
            return results

    def stats(self) -> dict[str, object]:
        with self._lock:
            assert self.index is not None
            return {
                "size": self.index.ntotal,
                "model_version": self.version,
                "index_type": self.index.index_type,
                "dimension": self.index.dim,
                "on_gpu": self.index.on_gpu,
                "built_time": self.index.built_time,
            }


def _net(changes: list[Change]) -> tuple[dict[int, None], set[int]]:
    """Rows to add (in order) and rows to remove after a run of changes; an add undone later is neither."""
    added: dict[int, None] = {}
    removed: set[int] = set()
    for change in changes:
        if change.op == "add":
            added[change.row_id] = None
        elif change.row_id in added:
            del added[change.row_id]
        else:
            removed.add(change.row_id)
    return added, removed
