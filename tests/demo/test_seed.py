"""Loading the catalogue degrades: a service that cannot take it is reported, never raised."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from demo.catalogue import Params, build
from demo.seed import seed


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build(out, Params(products=4, reviews_per_product=2, users=10, events_per_user=2.0), progress=False)
    return out


async def test_an_unreachable_service_is_reported_and_the_other_still_tried(tiny: Path) -> None:
    addresses = {"vision": f"127.0.0.1:{closed_port()}", "sentiment": f"127.0.0.1:{closed_port()}"}
    done = await seed(tiny, addresses, token=None)
    assert set(done) == {"vision", "sentiment"}
    assert all(isinstance(v, str) and v.startswith("UNAVAILABLE") for v in done.values()), done


async def test_stopping_loads_nothing(tiny: Path) -> None:
    done = await seed(tiny, {"vision": f"127.0.0.1:{closed_port()}"}, token=None, stopping=lambda: True)
    assert done == {}
