"""One running suite per test session (``suite.py``: every service and the gateway as processes, as
``make run`` starts them, with small real models), shared by the fuzz and the regression tests.

The gateway's slow-client limits and breaker open time are short here so that each test is quick;
what the tests check (a slow client is closed, the breaker stays closed) does not depend on them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.abuse.suite import Suite, running_suite

GATEWAY_ENV = {
    "CBEC_GATEWAY_HTTP_HEADER_TIMEOUT_S": "2",
    "CBEC_GATEWAY_HTTP_BODY_TIMEOUT_S": "2",
    "CBEC_BREAKER_OPEN_S": "2",
}


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    with running_suite(tmp_path_factory.mktemp("abuse"), gateway_env=GATEWAY_ENV) as running:
        yield running
