"""Fashion-MNIST, the default product catalogue: 70,000 real 28x28 clothing images in 10 classes.

It ships in the Debian package ``dataset-fashion-mnist`` (idx files under
``/usr/share/datasets/fashion-mnist``). Without root, ``fetch`` unpacks that package into the data
folder with ``apt-get download`` + ``dpkg-deb -x`` instead of installing it.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import encode_png

log = logging.getLogger("cbec.vision.data")

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where `make setup` unpacks the Debian package (no root install): data/deb/<the package's own paths>.
REPO_DEB_DIR = Path(__file__).resolve().parents[2] / "data" / "deb" / SYSTEM_DIR.relative_to("/")
PACKAGE_SUBDIR = Path("usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataError(RuntimeError):
    pass


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, 28, 28) uint8
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray | range) -> Split:
        idx = np.asarray(indices)
        return Split(self.images[idx], self.labels[idx])

    def png(self, i: int) -> bytes:
        return encode_png(self.images[i])


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzipped or not): magic 0x00 0x00 <dtype 0x08=uint8> <ndim>, big-endian dims."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an idx file")
    if raw[2] != 0x08:
        raise DataError(f"{path}: idx element type {raw[2]:#x} is not uint8")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: {len(raw) - header} data bytes, dims {dims} need {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def locate(data_dir: Path | None = None, folder: Path | None = None) -> Path:
    """The folder holding the idx files: ``folder`` (the service's ``vision_fashion_mnist_dir``,
    ``CBEC_VISION_FASHION_MNIST_DIR``), the installed package, or a copy unpacked into ``data_dir``."""
    candidates = [] if folder is None else [Path(folder)]
    candidates += [SYSTEM_DIR, REPO_DEB_DIR]
    if data_dir is not None:
        candidates.append(Path(data_dir) / "fashion-mnist" / PACKAGE_SUBDIR)
    for folder in candidates:
        if _has_files(folder):
            return folder
    raise DataError(
        f"Fashion-MNIST not found in {', '.join(map(str, candidates))}: install the Debian package "
        f"({PACKAGE}) or run `python -m services.vision.defaults`, which unpacks it into the data folder"
    )


def fetch(data_dir: Path, folder: Path | None = None) -> Path:
    """Locate the data set, unpacking the Debian package into ``data_dir`` when it is not installed."""
    try:
        return locate(data_dir, folder)
    except DataError:
        pass
    target = Path(data_dir) / "fashion-mnist"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError(f"Fashion-MNIST is not installed and apt-get/dpkg-deb are missing: install {PACKAGE}")
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s with apt-get", PACKAGE)
        done = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if done.returncode != 0 or not debs:
            raise DataError(
                f"apt-get download {PACKAGE} failed ({done.stderr.strip()[-300:]}); "
                f"run `apt-get update` or install {PACKAGE}"
            )
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fashion-mnist-", dir=data_dir))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    return locate(data_dir)


def load(split: str, data_dir: Path | None = None, folder: Path | None = None) -> Split:
    """``train`` (60,000) or ``test`` (10,000) images with their class labels (``folder``: see ``locate``)."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}")
    folder = locate(data_dir, folder)
    images_name, labels_name = FILES[split]
    images = read_idx(folder / images_name)
    labels = read_idx(folder / labels_name).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    return Split(images, labels)


def product_id(split: str, i: int) -> str:
    return f"fmnist-{split}-{i:05d}"
