"""Property-based fuzzing of every gRPC request message of every service, on the real running suite.

Each method gets ``CBEC_FUZZ_EXAMPLES`` (default 50) derandomized hypothesis draws from strategies made
from its request descriptor (``protofuzz.py``), sent the way its real callers send them
(``fuzzing.py``). Whatever the input: never INTERNAL/UNKNOWN, every INVALID_ARGUMENT names a field in
a BadRequest, no error over 4 KB, no size limit reported as RESOURCE_EXHAUSTED, and the process stays
up and SERVING. A failure is shrunk by hypothesis to a minimal request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.abuse.fuzzing import Caller, Target, fuzz, targets
from tests.abuse.suite import Suite

EXAMPLES = int(os.environ.get("CBEC_FUZZ_EXAMPLES", "50"))


@pytest.fixture(scope="module")
def caller(suite: Suite) -> Iterator[Caller]:
    c = Caller(suite)
    yield c
    c.close()


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.id)
def test_fuzzed_requests_get_an_answer_or_a_clear_client_error(caller: Caller, target: Target) -> None:
    stats = fuzz(caller, target, EXAMPLES, strict=True)
    assert stats.requests >= EXAMPLES
