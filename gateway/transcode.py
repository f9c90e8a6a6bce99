"""HTTP/JSON <-> protobuf for one route, following the ``google.api.http`` rules and proto3 JSON.

A request message is built from (1) the path variables, (2) the body (``body: "*"``: the whole
message; ``body: "field"``: that field) and (3) query parameters for every field the body does not
carry (``a.b=1``, repeated fields by repeating the parameter). JSON follows the proto3 mapping
(``json_format`` with ``ignore_unknown_fields=False``): an unknown field, a wrong type, two members of a
oneof, a path variable that contradicts the body, or an unknown query parameter are all
INVALID_ARGUMENT (HTTP 400) with a ``BadRequest`` detail naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument, ServiceError, Violation

from .descriptors import Route, field_by_path
from .errors import GatewayError
from .jsonenc import to_dict

NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
SCALAR_WKT = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)
_TIMEOUT_RE = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def too_large(what: str, limit: int) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{what} is larger than the limit of {limit} bytes",
        reason="REQUEST_TOO_LARGE",
        metadata={"limit_bytes": str(limit)},
        http_status=413,
    )


def bad(field: str, description: str) -> ServiceError:
    return InvalidArgument([Violation(field, description)])


def parse_timeout(value: str | None) -> float | None:
    """A ``grpc-timeout`` header value (``250m``, ``2S``) in seconds; None when absent."""
    if not value:
        return None
    m = _TIMEOUT_RE.match(value.strip())
    if m is None:
        raise bad("grpc-timeout", "must be 1-8 digits and a unit H, M, S, m, u or n (e.g. 500m)")
    return int(m.group(1)) * _TIMEOUT_UNITS[m.group(2)]


def parse_json(data: bytes, what: str = "body") -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise bad(what, "is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise bad(what, f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise bad(what, "is nested too deeply") from None


def _bool(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise bad(name, "must be true or false")


def _scalar_from_text(f: FieldDescriptor, text: str, name: str) -> Any:
    """A query/path string as the JSON value ``json_format`` expects for the field."""
    if f.type == FieldDescriptor.TYPE_BOOL or (
        f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name == "google.protobuf.BoolValue"
    ):
        return _bool(text, name)
    return text


def _find_key(node: dict[str, Any], f: FieldDescriptor) -> str | None:
    for key in (f.name, f.json_name):
        if key in node:
            return key
    return None


def _place(target: dict[str, Any], chain: list[FieldDescriptor], value: Any, name: str, source: str) -> None:
    node = target
    for f in chain[:-1]:
        key = _find_key(node, f) or f.name
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise bad(name, f"conflicts with the {source}")
        node = child
    last = chain[-1]
    key = _find_key(node, last)
    if last.is_repeated:
        existing = node.setdefault(key or last.name, [])
        if not isinstance(existing, list):
            raise bad(name, "must be a list")
        existing.append(value)
    elif key is not None:
        if str(node[key]) != str(value):
            raise bad(name, f"is {value!r} in the {source} but {node[key]!r} in the body")
    else:
        node[last.name] = value


def _chain_for_parameter(message: Descriptor, name: str) -> list[FieldDescriptor]:
    try:
        chain = field_by_path(message, name)
    except KeyError:
        raise bad(name, f"is not a field of {message.full_name}") from None
    for f in chain[:-1]:
        if f.is_repeated:
            raise bad(name, "cannot address an element of a repeated field")
    last = chain[-1]
    if last.message_type is not None and (
        last.message_type.GetOptions().map_entry or last.message_type.full_name not in SCALAR_WKT
    ):
        raise bad(name, "is a message; send it in a request body")
    return chain


def parse_message(cls: type[Message], obj: Any, what: str = "body") -> Message:
    if not isinstance(obj, dict):
        raise bad(what, f"must be a JSON object ({cls.DESCRIPTOR.full_name})")
    message = cls()
    try:
        json_format.ParseDict(obj, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise bad(what, str(exc).split("\n")[0]) from None
    except RecursionError:
        raise bad(what, "is nested too deeply") from None
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        raise bad(what, f"does not match {cls.DESCRIPTOR.full_name}: {type(exc).__name__}") from None
    return message


def build_request(
    route: Route,
    path_vars: dict[str, str],
    query: Iterable[tuple[str, str]],
    body: Any | None,
    what: str = "body",
) -> Message:
    """The request message for one HTTP request (``body`` is the parsed JSON, or None when absent)."""
    info = route.method
    descriptor = info.method.input_type
    query = list(query)
    if route.body == "*":
        if query:
            raise bad(
                query[0][0], "query parameters are not accepted: this method takes its request in the body"
            )
        payload = {} if body is None else body
        if not isinstance(payload, dict):
            raise bad(what, f"must be a JSON object ({descriptor.full_name})")
        payload = dict(payload)
    else:
        payload = {}
        if route.body:
            body_field = descriptor.fields_by_name[route.body]
            if body is not None:
                payload[body_field.name] = body
    for name, text in path_vars.items():
        chain = field_by_path(descriptor, name)
        _place(payload, chain, _scalar_from_text(chain[-1], text, name), name, "path")
    for name, text in query:
        chain = _chain_for_parameter(descriptor, name)
        if route.body and chain[0].name == route.body:
            raise bad(name, "is carried by the body")
        if name in path_vars:
            raise bad(name, "is set by the path")
        _place(payload, chain, _scalar_from_text(chain[-1], text, name), name, "query")
    return parse_message(info.request_cls, payload, what)


def to_json_dict(message: Message, response_body: str = "") -> Any:
    """The proto3 JSON value of a response (or of its ``response_body`` field), unset fields included."""
    if not response_body:
        return to_dict(message)
    f = message.DESCRIPTOR.fields_by_name[response_body]
    return to_dict(message).get(f.json_name)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode("utf-8")


def encode_response(message: Message, response_body: str = "") -> bytes:
    """The JSON of a backend response; a response JSON cannot represent is a backend fault (INTERNAL)."""
    try:
        return dumps(to_json_dict(message, response_body))
    except (json_format.Error, ValueError, TypeError) as exc:
        raise GatewayError(
            grpc.StatusCode.INTERNAL,
            f"the service returned a {message.DESCRIPTOR.full_name} that has no JSON form ({exc})",
            reason="RESPONSE_NOT_JSON",
        ) from None


async def read_body(content: Any, content_length: int | None, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes ``limit`` bytes."""
    if content_length is not None and content_length > limit:
        raise too_large("the request body", limit)
    chunks = []
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large("the request body", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def ndjson_values(content: Any, line_limit: int, total_limit: int) -> AsyncIterator[tuple[str, Any]]:
    """(position, JSON value) for each non-empty line of a newline-delimited JSON body, as it arrives."""
    buffer = bytearray()
    size = 0
    line_no = 0
    async for chunk in content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > total_limit:
            raise too_large("the request stream", total_limit)
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            line_no += 1
            if line.strip():
                where = f"line {line_no}"
                yield where, parse_json(line, where)
        if len(buffer) > line_limit:
            raise too_large(f"line {line_no + 1} of the request stream", line_limit)
    if buffer.strip():
        where = f"line {line_no + 1}"
        yield where, parse_json(bytes(buffer), where)
