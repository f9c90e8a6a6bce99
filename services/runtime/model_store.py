"""Versioned model store and the slot that serves one loaded version.

Layout: ``<models dir>/<service>/<version>/manifest.json`` plus whatever files the model needs.
Versions are UTC timestamps, so their names sort by age. A version is written in a hidden temporary
folder and renamed into place only when complete, so a half-written version is never seen. The slot
swaps the serving model atomically (a reference assignment): calls in flight keep the object they
took, and a version that fails to load leaves the previous one serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import Unavailable
from .metrics import RuntimeMetrics

log = logging.getLogger("cbec.models")
MANIFEST = "manifest.json"
M = TypeVar("M")


@dataclass
class Manifest:
    service: str
    version: str
    created: datetime
    metrics: dict[str, float] = field(default_factory=dict)
    data_fingerprint: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "service": self.service,
                "version": self.version,
                "created": self.created.isoformat(),
                "metrics": self.metrics,
                "data_fingerprint": self.data_fingerprint,
                "params": self.params,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        raw = json.loads((path / MANIFEST).read_text())
        created = datetime.fromisoformat(raw["created"])
        return cls(
            service=str(raw["service"]),
            version=str(raw["version"]),
            created=created if created.tzinfo else created.replace(tzinfo=UTC),
            metrics={str(k): float(v) for k, v in raw.get("metrics", {}).items()},
            data_fingerprint=str(raw.get("data_fingerprint", "")),
            params=dict(raw.get("params", {})),
        )


@dataclass(frozen=True)
class VersionEntry:
    version: str
    path: Path
    manifest: Manifest | None
    error: str = ""

    @property
    def valid(self) -> bool:
        return self.manifest is not None


class ModelStore:
    def __init__(self, root: Path, service: str) -> None:
        self.root = Path(root)
        self.service = service
        self.dir = self.root / service

    def versions(self) -> list[VersionEntry]:
        """Every version folder, newest first; invalid ones carry the reason."""
        if not self.dir.is_dir():
            return []
        entries = []
        for path in sorted(self.dir.iterdir(), key=lambda p: p.name, reverse=True):
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                manifest = Manifest.read(path)
                if manifest.version != path.name:
                    raise ValueError(f"manifest says version {manifest.version!r}")
                entries.append(VersionEntry(path.name, path, manifest))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                entries.append(VersionEntry(path.name, path, None, f"{type(exc).__name__}: {exc}"))
        return entries

    def get(self, version: str) -> VersionEntry:
        for entry in self.versions():
            if entry.version == version:
                return entry
        raise KeyError(f"no version {version!r} of {self.service}")

    def newest_valid(self) -> VersionEntry | None:
        return next((e for e in self.versions() if e.valid), None)

    @contextmanager
    def new_version(
        self,
        metrics: dict[str, float] | None = None,
        data_fingerprint: str = "",
        params: dict[str, Any] | None = None,
    ) -> Iterator[tuple[Path, Manifest]]:
        """Write a new version: yields (folder, manifest); the caller fills both, the version
        appears atomically when the block ends without error and is discarded otherwise."""
        self.dir.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        version = now.strftime("%Y%m%dT%H%M%S%fZ")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir))
        manifest = Manifest(
            self.service, version, now, dict(metrics or {}), data_fingerprint, dict(params or {})
        )
        try:
            yield tmp, manifest
            (tmp / MANIFEST).write_text(manifest.to_json())
            os.chmod(tmp, 0o755)
            os.rename(tmp, self.dir / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("wrote model version", extra={"model_service": self.service, "version": version})


def fingerprint(*paths: Path) -> str:
    """sha256 over the contents of files (data provenance recorded in manifests)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Loaded(Generic[M]):
    model: M
    manifest: Manifest


class ModelSlot(Generic[M]):
    """The serving model of one service, loaded from the store and swapped atomically."""

    def __init__(
        self,
        store: ModelStore,
        loader: Callable[[Path, Manifest], M],
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self.store = store
        self._loader = loader
        self._metrics = metrics
        self._current: Loaded[M] | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Loaded[M] | None:
        return self._current

    def require(self) -> Loaded[M]:
        """The serving model, or UNAVAILABLE while none is loaded."""
        current = self._current
        if current is None:
            raise Unavailable(f"no {self.store.service} model is loaded yet", retry_after_s=5.0)
        return current

    async def load(self, version: str | None = None) -> Loaded[M]:
        """Load ``version`` (or the newest valid one, falling back to older ones if it fails).

        On failure the previous model keeps serving and ModelLoadError is raised.
        """
        async with self._lock:
            if version:
                try:
                    candidates = [self.store.get(version)]
                except KeyError as exc:
                    raise ModelLoadError(exc.args[0]) from None
            else:
                candidates = [e for e in self.store.versions() if e.valid]
            if not candidates:
                log.error("no valid model version", extra={"models_dir": str(self.store.dir)})
                raise ModelLoadError(f"no valid {self.store.service} model version in the model store")
            errors = []
            for entry in candidates:
                if entry.manifest is None:
                    errors.append(f"{entry.version}: {entry.error}")
                    continue
                try:
                    model = await asyncio.to_thread(self._loader, entry.path, entry.manifest)
                except Exception as exc:
                    log.exception("model version %s failed to load", entry.version)
                    if self._metrics:
                        self._metrics.model_load_failures.labels(self.store.service).inc()
                    errors.append(f"{entry.version}: {type(exc).__name__}: {exc}")
                    continue
                self._current = Loaded(model, entry.manifest)
                if self._metrics:
                    self._metrics.set_model_version(entry.version)
                log.info("serving model version", extra={"version": entry.version})
                return self._current
            raise ModelLoadError("; ".join(errors))
