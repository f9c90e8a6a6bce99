"""Every ``google.rpc.ErrorInfo`` reason the suite returns, declared once: its domain, gRPC code, HTTP
status, metadata keys, meaning and what a client should do.

The reasons themselves stay string literals where the errors are raised (``GatewayError(...,
reason="RATE_LIMITED")``): tests/contracts/test_error_catalogue.py reads them out of the code (an AST
scan of services/ and gateway/) and checks that they are exactly the ones declared here, with the same
code, HTTP status and metadata, and that docs/errors.md shows this table (``python -m
services.runtime.error_catalogue --write`` rewrites it). The gateway's OpenAPI document lists the reasons
under each error response. Errors without an ``ErrorInfo`` (a service's INVALID_ARGUMENT with
``BadRequest`` field violations, a NOT_FOUND for an unknown id) are handled by their code alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

#: The domain of the reasons the gateway (HTTP bridge and gRPC front) adds.
GATEWAY_DOMAIN = "gateway.cbec.ai"
#: Where the rendered catalogue lives, relative to the repository root.
DOC_PATH = "docs/errors.md"
BEGIN_MARK = "<!-- error-catalogue:begin (generated: python -m services.runtime.error_catalogue --write) -->"
END_MARK = "<!-- error-catalogue:end -->"


@dataclass(frozen=True)
class ErrorReason:
    reason: str
    domain: str
    code: grpc.StatusCode
    http_status: int
    meaning: str
    action: str
    metadata: tuple[str, ...] = ()


def _gw(
    reason: str,
    code: grpc.StatusCode,
    http_status: int,
    meaning: str,
    action: str,
    metadata: tuple[str, ...] = (),
) -> ErrorReason:
    return ErrorReason(reason, GATEWAY_DOMAIN, code, http_status, meaning, action, metadata)


_C = grpc.StatusCode
CATALOGUE: tuple[ErrorReason, ...] = (
    _gw(
        "API_KEY_INVALID",
        _C.UNAUTHENTICATED,
        401,
        "The `x-api-key` is not a key this gateway knows (or is the development key, which only "
        "`CBEC_GATEWAY_ENV=dev` accepts).",
        "Fix the key; retrying the same key cannot succeed.",
    ),
    _gw(
        "BACKEND_NOT_CONFIGURED",
        _C.UNIMPLEMENTED,
        501,
        "The gateway has no backend configured for the method's service.",
        "Operator: configure the service's address. Client: do not retry.",
    ),
    _gw(
        "BODY_TIMEOUT",
        _C.DEADLINE_EXCEEDED,
        408,
        "The request body did not arrive within the bridge's body timeout; the connection is closed.",
        "Resend on a new connection; send the body promptly after the headers.",
        ("timeout_s",),
    ),
    _gw(
        "CORS_ORIGIN",
        _C.PERMISSION_DENIED,
        403,
        "A CORS preflight from an origin the gateway does not allow.",
        "Operator: add the origin to the gateway's allowed CORS origins.",
    ),
    _gw(
        "CREDENTIALS_MISSING",
        _C.UNAUTHENTICATED,
        401,
        "Neither an `x-api-key` header nor a Bearer token was sent.",
        "Send an API key or a JWT (the `WWW-Authenticate` header says how).",
    ),
    _gw(
        "DEMO_CATALOGUE_INCOMPLETE",
        _C.NOT_FOUND,
        404,
        "The storefront's demo catalogue folder has no `products.json`.",
        "Operator: rebuild the demo catalogue (`python -m demo.catalogue`).",
    ),
    _gw(
        "DEMO_CATALOGUE_NOT_CONFIGURED",
        _C.NOT_FOUND,
        404,
        "The storefront asked for the demo catalogue, and this gateway serves none.",
        "Operator: point the gateway at a demo catalogue folder, or do not serve the storefront.",
    ),
    _gw(
        "FAIR_SHARE_EXCEEDED",
        _C.RESOURCE_EXHAUSTED,
        429,
        "These credentials hold more than their fair share of a busy backend's calls in flight.",
        "Retry after the `RetryInfo` delay (`Retry-After`); send fewer concurrent calls.",
        ("backend", "share"),
    ),
    _gw(
        "HEADER_TOO_LARGE",
        _C.INVALID_ARGUMENT,
        431,
        "The request line or a header line is over the bridge's limit.",
        "Send shorter headers (e.g. a shorter token); do not retry as is.",
        ("limit_bytes",),
    ),
    _gw(
        "MALFORMED_REQUEST",
        _C.INVALID_ARGUMENT,
        400,
        "The request is not well-formed HTTP/1.1.",
        "Fix the client's HTTP; do not retry as is.",
    ),
    _gw(
        "METHOD_NOT_ALLOWED",
        _C.UNIMPLEMENTED,
        405,
        "The path exists, but not with this HTTP method; `Allow` lists the methods it takes.",
        "Use a method from `Allow`.",
    ),
    _gw(
        "METHOD_NOT_IMPLEMENTED",
        _C.UNIMPLEMENTED,
        501,
        "The request method is not an HTTP method the bridge knows (or the bytes are not HTTP).",
        "Use GET, POST or DELETE as the OpenAPI document says.",
    ),
    _gw(
        "NOT_FOUND",
        _C.NOT_FOUND,
        404,
        "No storefront or demo-catalogue file at this path.",
        "Check the path; do not retry.",
    ),
    _gw(
        "OVERLOADED",
        _C.RESOURCE_EXHAUSTED,
        429,
        "The bridge is at its limit of concurrent requests.",
        "Retry after the `RetryInfo` delay (`Retry-After`), with backoff.",
    ),
    _gw(
        "PRODUCT_IMAGE_NOT_FOUND",
        _C.NOT_FOUND,
        404,
        "The demo catalogue has no image for this product.",
        "Show a placeholder; do not retry.",
    ),
    _gw(
        "RATE_LIMITED",
        _C.RESOURCE_EXHAUSTED,
        429,
        "These credentials exceeded their rate limit (calls per second and burst).",
        "Retry after the `RetryInfo` delay (`Retry-After`); ask for a higher limit if it persists.",
    ),
    _gw(
        "REQUEST_TOO_LARGE",
        _C.INVALID_ARGUMENT,
        413,
        "The request body (or one streamed message) is over the bridge's size limit.",
        "Send less per call (split the batch); retrying the same body cannot succeed.",
        ("limit_bytes",),
    ),
    _gw(
        "RESPONSE_NOT_JSON",
        _C.INTERNAL,
        500,
        "A backend answered with a message the proto3 JSON mapping cannot represent (e.g. a NaN timestamp).",
        "Report it with the `RequestInfo` request id; a retry is unlikely to help.",
    ),
    _gw(
        "RISK_UNAVAILABLE",
        _C.UNAVAILABLE,
        503,
        "`AssessOrder` got no risk decision, so it fails closed: the order is neither approved nor declined.",
        "Retry after the `RetryInfo` delay if any; never approve the order without a decision.",
        ("decision",),
    ),
    _gw(
        "ROUTE_NOT_FOUND",
        _C.NOT_FOUND,
        404,
        "No API at this path.",
        "Check the path against `/openapi.json`.",
    ),
    _gw(
        "SCOPE_MISSING",
        _C.PERMISSION_DENIED,
        403,
        "The credentials are valid but lack the method's scope (`x-required-scope` in the OpenAPI document).",
        "Use credentials that hold the scope named in the metadata; do not retry.",
        ("scope",),
    ),
    _gw(
        "SERVICE_UNKNOWN",
        _C.NOT_FOUND,
        404,
        "The model-admin call names a service that is not behind this gateway.",
        "Use one of the services listed in the metadata.",
        ("services",),
    ),
    _gw(
        "TOKEN_INVALID",
        _C.UNAUTHENTICATED,
        401,
        "The `Authorization` header is not `Bearer <token>`, or the JWT failed verification "
        "(signature, expiry, audience, issuer).",
        "Get a fresh token; retrying the same token cannot succeed.",
    ),
    _gw(
        "TOO_MANY_HEADERS",
        _C.INVALID_ARGUMENT,
        431,
        "The request has more header lines than the bridge's limit.",
        "Send fewer headers; do not retry as is.",
        ("limit",),
    ),
    _gw(
        "USER_NOT_ALLOWED",
        _C.PERMISSION_DENIED,
        403,
        "The request names a user other than the one the credentials are bound to (and they lack the "
        "act-as-user scope); the `BadRequest` detail names the field.",
        "Leave the user field empty or send the caller's own user.",
        ("field",),
    ),
)
BY_REASON: dict[str, ErrorReason] = {e.reason: e for e in CATALOGUE}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table() -> str:
    """The catalogue as the Markdown table docs/errors.md shows between its marks."""
    rows = [
        "| Reason | Domain | gRPC code | HTTP | Metadata | Meaning | What a client should do |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in sorted(CATALOGUE, key=lambda e: e.reason):
        metadata = ", ".join(f"`{k}`" for k in e.metadata)
        rows.append(
            f"| `{e.reason}` | `{e.domain}` | {e.code.name} | {e.http_status} | {metadata} "
            f"| {_cell(e.meaning)} | {_cell(e.action)} |"
        )
    return "\n".join(rows)


def render(document: str) -> str:
    """``document`` with the text between its marks replaced by the current table."""
    head, sep, rest = document.partition(BEGIN_MARK)
    _, sep2, tail = rest.partition(END_MARK)
    if not sep or not sep2:
        raise ValueError(f"{DOC_PATH} must hold {BEGIN_MARK!r} and {END_MARK!r}")
    return f"{head}{BEGIN_MARK}\n{markdown_table()}\n{END_MARK}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the error catalogue, or rewrite its table in docs.")
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in {DOC_PATH}")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args(argv)
    if not args.write:
        print(markdown_table())
        return 0
    path = args.root / DOC_PATH
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
