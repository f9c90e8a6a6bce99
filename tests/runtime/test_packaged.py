"""Packaged files are found through installed distributions, and a missing one says how to install it."""

from __future__ import annotations

import pytest

from services.runtime.packaged import PackagedFileMissing, packaged_file


def test_finds_a_file_inside_an_installed_distribution() -> None:
    path = packaged_file("grpcio-health-checking", "grpc_health/v1/health.py", "1.0")
    assert path.is_file() and path.name == "health.py"


def test_missing_distribution_names_the_install_command() -> None:
    with pytest.raises(PackagedFileMissing, match=r"pip install --no-deps no-such-dist==1\.2"):
        packaged_file("no-such-dist", "x.bin", "1.2")


def test_missing_file_raises_the_callers_error() -> None:
    class DomainError(RuntimeError):
        pass

    with pytest.raises(DomainError, match="missing from grpcio-health-checking"):
        packaged_file("grpcio-health-checking", "grpc_health/v1/no_such_file.bin", "1.0", error=DomainError)
