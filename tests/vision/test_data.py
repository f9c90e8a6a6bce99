"""Fashion-MNIST reading: idx files the test writes, and the real Debian package when installed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from services.vision import data
from services.vision.config import VisionSettings
from services.vision.images import ImageLimits, decode


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_dataset(folder: Path, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = data.FILES[split]
        write_idx(folder / images_name, rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / labels_name, np.arange(n) % 10)


def test_read_idx_plain_and_gzipped(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", array, compress=False)
    write_idx(tmp_path / "a.idx.gz", array, compress=True)
    assert np.array_equal(data.read_idx(tmp_path / "a.idx"), array)
    assert np.array_equal(data.read_idx(tmp_path / "a.idx.gz"), array)


def test_read_idx_refuses_damaged_files(tmp_path: Path) -> None:
    array = np.zeros((4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "ok", array, compress=False)
    raw = (tmp_path / "ok").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-5])
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    (tmp_path / "float").write_bytes(raw[:2] + b"\x0d" + raw[3:])
    for name in ("short", "magic", "float"):
        with pytest.raises(data.DataError):
            data.read_idx(tmp_path / name)


def test_load_and_png_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dataset(tmp_path)
    # The folder the service's settings name (CBEC_VISION_FASHION_MNIST_DIR) is searched first.
    monkeypatch.setenv("CBEC_VISION_FASHION_MNIST_DIR", str(tmp_path))
    folder = VisionSettings().vision_fashion_mnist_dir
    assert folder == tmp_path
    train = data.load("train", folder=folder)
    assert len(train) == 12 and train.images.shape == (12, 28, 28)
    assert list(train.labels[:3]) == [0, 1, 2]
    pixels = decode(train.png(3), 28, ImageLimits())
    assert np.array_equal(pixels[..., 0], train.images[3])  # lossless: the catalogue image is the data
    with pytest.raises(ValueError):
        data.load("validation", folder=folder)


def test_locate_names_the_package_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(data, "REPO_DEB_DIR", tmp_path / "not-unpacked")
    with pytest.raises(data.DataError, match=data.PACKAGE):
        data.locate(tmp_path / "data", tmp_path / "nowhere")


def test_real_fashion_mnist_package() -> None:
    """The real data set, as `make setup` unpacks it (a missing package fails here, never skips)."""
    test = data.load("test")
    assert test.images.shape == (10_000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10
