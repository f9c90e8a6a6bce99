"""Device selection logic; GPU counts are injected (there is no GPU here to ask)."""

from __future__ import annotations

import pytest

from services.runtime.device import Device, DeviceError, select_device, visible_gpus


def test_cpu_is_always_cpu() -> None:
    assert select_device("cpu", lambda: 4) == Device("cpu")


def test_auto_takes_a_gpu_when_present() -> None:
    d = select_device("auto", lambda: 2)
    assert d == Device("cuda", 0)
    assert (d.torch, d.faiss_gpu, d.implicit_use_gpu) == ("cuda:0", 0, True)


def test_auto_falls_back_to_cpu() -> None:
    d = select_device("auto", lambda: 0)
    assert (d.torch, d.faiss_gpu, d.implicit_use_gpu) == ("cpu", None, False)


def test_explicit_gpu_index() -> None:
    assert select_device("cuda:1", lambda: 2) == Device("cuda", 1)
    assert select_device("cuda", lambda: 1) == Device("cuda", 0)


def test_explicit_gpu_that_is_missing_fails() -> None:
    with pytest.raises(DeviceError, match="2 GPU"):
        select_device("cuda:2", lambda: 2)
    with pytest.raises(DeviceError):
        select_device("cuda", lambda: 0)


def test_this_machine_has_no_gpu_visible_to_auto() -> None:
    # CI and development machines have no GPU; on a GPU node this is the check that it is seen.
    assert select_device("auto") == (Device("cuda", 0) if visible_gpus() else Device("cpu"))
