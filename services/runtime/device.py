"""Device selection shared by every torch, faiss and implicit model.

``auto`` takes the first GPU when one is visible and the CPU otherwise; ``cuda`` / ``cuda:N`` demand
a GPU and fail start-up when it is not there (a GPU node that silently runs on CPU is an outage that
looks healthy). GPU counts come from whichever library is installed, imported lazily so CPU images
need none of them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass


class DeviceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch(self) -> str:
        """Argument for ``torch.device`` / ``.to()``."""
        return f"cuda:{self.index}" if self.is_gpu else "cpu"

    @property
    def faiss_gpu(self) -> int | None:
        """GPU id for ``faiss.index_cpu_to_gpu``; None keeps the index on the CPU."""
        return self.index if self.is_gpu else None

    @property
    def implicit_use_gpu(self) -> bool:
        return self.is_gpu

    def __str__(self) -> str:
        return self.torch


def visible_gpus() -> int:
    """Number of CUDA devices any installed backend can see (0 without a GPU or a GPU build)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.device_count())
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        get = getattr(faiss, "get_num_gpus", None)
        if get is not None and get() > 0:
            return int(get())
    return 0


def select_device(spec: str, gpu_count: Callable[[], int] = visible_gpus) -> Device:
    """Resolve ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` against the GPUs actually present."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return Device("cpu")
    if spec == "auto":
        return Device("cuda", 0) if gpu_count() > 0 else Device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        count = gpu_count()
        if index >= count:
            raise DeviceError(f"device {spec!r} requested but {count} GPU(s) are visible")
        return Device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
