"""The bridge against its own OpenAPI document, fuzzed by schemathesis (PyPI) with real backends behind it.

No server error (5xx) for any generated request, valid or not; responses match the documented status
codes, content types, headers and schemas; every operation refuses requests without credentials.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import FULL_KEY

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "ignored_auth",
        "unsupported_method",
    ]
)


@pytest.mark.timeout(240)
async def test_schemathesis_finds_no_server_error(gw: Any, tmp_path: Path) -> None:
    examples = os.environ.get("CBEC_FUZZ_EXAMPLES", "8")
    proc = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{gw.http_url}/openapi.json",
        "--header",
        f"x-api-key: {FULL_KEY}",
        "--checks",
        CHECKS,
        "--max-examples",
        examples,
        "--phases",
        "coverage,fuzzing",
        "--workers",
        "1",
        "--seed",
        "20261129",
        "--suppress-health-check",
        "all",
        "--request-timeout",
        "10",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    output, _ = await proc.communicate()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "26 passed" in text or "passed" in text
