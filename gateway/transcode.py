"""HTTP/JSON <-> protobuf for one route, following the ``google.api.http`` rules and proto3 JSON.

A request message is built from (1) the path variables, (2) the body (``body: "*"``: the whole
message; ``body: "field"``: that field) and (3) query parameters for every field the body does not
carry (``a.b=1``, repeated fields by repeating the parameter). JSON follows the proto3 mapping
(``json_format`` with ``ignore_unknown_fields=False``): an unknown field, a wrong type, two members of a
oneof, a path variable that contradicts the body, or an unknown query parameter are all
INVALID_ARGUMENT (HTTP 400) with a ``BadRequest`` detail naming the field.

JSON is read strictly, beyond what ``json_format`` checks (``strict_check``): a key twice in one object,
one field under both its names (``userId`` and ``user_id``), ``true``/``false`` for a number or an enum
(``json_format`` reads them as 1 and 0) and a bytes field that is not base64 (``json_format`` drops the
characters it does not know, so ``"!!"`` would be an empty image) are all INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.runtime.errors import QUOTE_CHARS, InvalidArgument, ServiceError, Violation, quote

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
# Standard or URL-safe alphabet, padded or not (the proto3 JSON mapping accepts both).
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
_NUMERIC_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_ENUM,
    }
)
_WRAPPERS = frozenset(n for n in SCALAR_WKT if n.endswith("Value"))
_FIELDS_BY_KEY: dict[str, dict[str, FieldDescriptor]] = {}


def too_large(what: str, limit: int) -> GatewayError:
    """A body over the bridge's size limit: HTTP 413, with INVALID_ARGUMENT as its code (a limit of the
    request, not load: retrying the same body cannot succeed)."""
    return GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{what} is larger than the limit of {limit} bytes",
        violations=(Violation("body", f"{what} is larger than the limit of {limit} bytes"),),
        reason="REQUEST_TOO_LARGE",
        metadata={"limit_bytes": str(limit)},
        http_status=413,
    )


def too_slow(what: str, timeout: float) -> GatewayError:
    """A body that did not arrive in time (HTTP 408); the connection is closed after the answer."""
    return GatewayError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"{what} did not arrive within {timeout:g} s",
        reason="BODY_TIMEOUT",
        metadata={"timeout_s": f"{timeout:g}"},
        headers={"Connection": "close"},
        http_status=408,
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


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def parse_json(data: bytes, what: str = "body") -> Any:
    """The JSON value of a body or NDJSON line; a key twice in one object is refused, not "last wins"."""
    try:
        return json.loads(data, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise bad(_in(what, exc.key[:QUOTE_CHARS]), "is given twice in one JSON object") from None
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
            raise bad(name, f"is {quote(value)} in the {source} but {quote(node[key])} in the body")
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


def _in(what: str, path: str) -> str:
    """A field path inside a body (``transaction.amount``), a JSON array item or an NDJSON line."""
    if what == "body":
        return path
    if what.startswith("["):
        return f"{what}.{path}"
    return f"{what}: {path}"


def _fields_by_key(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    fields = _FIELDS_BY_KEY.get(descriptor.full_name)
    if fields is None:
        fields = {}
        for f in descriptor.fields:
            fields[f.name] = f
            fields[f.json_name] = f
        _FIELDS_BY_KEY[descriptor.full_name] = fields
    return fields


def _check_scalar(f: FieldDescriptor, value: Any, path: str, what: str) -> None:
    if isinstance(value, bool) and f.type in _NUMERIC_TYPES:
        kind = "an enum name or number" if f.type == FieldDescriptor.TYPE_ENUM else "a number"
        raise bad(_in(what, path), f"must be {kind}, not {'true' if value else 'false'}")
    if f.type == FieldDescriptor.TYPE_BYTES and isinstance(value, str):
        if (
            _BASE64_RE.fullmatch(value) is None
            or len(value.rstrip("=")) % 4 == 1
            or ("=" in value and len(value) % 4)
        ):
            raise bad(_in(what, path), "is not valid base64 (standard or URL-safe alphabet, no line breaks)")
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        name = f.message_type.full_name
        if name in _WRAPPERS:
            _check_scalar(f.message_type.fields_by_name["value"], value, path, what)
        elif isinstance(value, dict) and not name.startswith("google.protobuf."):
            strict_check(f.message_type, value, f"{path}.", what)


def strict_check(descriptor: Descriptor, obj: dict[str, Any], prefix: str = "", what: str = "body") -> None:
    """What ``json_format`` lets through (see the module docstring): one field under both names,
    booleans for numbers, bytes that are not base64. Wrong types it reports itself are left to it."""
    fields = _fields_by_key(descriptor)
    seen: dict[str, str] = {}
    for key, value in obj.items():
        f = fields.get(key)
        if f is None:
            continue  # json_format names the unknown field
        path = f"{prefix}{f.json_name}"
        other = seen.get(f.name)
        if other is not None:
            raise bad(_in(what, path), f'is given twice, as "{other}" and as "{key}"')
        seen[f.name] = key
        if value is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            if isinstance(value, dict):
                value_field = f.message_type.fields_by_name["value"]
                for k, v in value.items():
                    if v is not None:
                        _check_scalar(value_field, v, f"{path}[{quote(k)}]", what)
        elif f.is_repeated and isinstance(value, list):
            for i, v in enumerate(value):
                if v is not None:
                    _check_scalar(f, v, f"{path}[{i}]", what)
        else:
            _check_scalar(f, value, path, what)


def parse_message(cls: type[Message], obj: Any, what: str = "body") -> Message:
    if not isinstance(obj, dict):
        raise bad(what, f"must be a JSON object ({cls.DESCRIPTOR.full_name})")
    message = cls()
    try:
        strict_check(cls.DESCRIPTOR, obj, "", what)
        json_format.ParseDict(obj, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise bad(what, str(exc).split("\n")[0]) from None  # Violation caps its description
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


async def read_body(
    content: Any, content_length: int | None, limit: int, timeout: float | None = None
) -> bytes:
    """The whole body, refusing (413) as soon as it passes ``limit`` bytes, and (408) when it has not
    arrived ``timeout`` seconds after the read began."""
    if content_length is not None and content_length > limit:
        raise too_large("the request body", limit)
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise too_large("the request body", limit)
                chunks.append(chunk)
    except TimeoutError:
        raise too_slow("the request body", timeout or 0.0) from None
    return b"".join(chunks)


async def ndjson_values(
    content: Any, line_limit: int, total_limit: int, line_timeout: float | None = None
) -> AsyncIterator[tuple[str, Any]]:
    """(position, JSON value) for each non-empty line of a newline-delimited JSON body, as it arrives.

    A line must be complete ``line_timeout`` seconds after its first byte (408); the pause between
    lines is not limited here (a bidi chat waits for its user), only by the call's deadline.
    """
    buffer = bytearray()
    size = 0
    line_no = 0
    line_started: float | None = None
    loop = asyncio.get_running_loop()
    while True:
        deadline = None if line_timeout is None or line_started is None else line_started + line_timeout
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await content.read(64 * 1024)
        except TimeoutError:
            raise too_slow(f"line {line_no + 1} of the request stream", line_timeout or 0.0) from None
        if not chunk:
            break
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
            line_started = None
            if line.strip():
                where = f"line {line_no}"
                yield where, parse_json(line, where)
        if len(buffer) > line_limit:
            raise too_large(f"line {line_no + 1} of the request stream", line_limit)
        if buffer and line_started is None:
            line_started = loop.time()
    if buffer.strip():
        where = f"line {line_no + 1}"
        yield where, parse_json(bytes(buffer), where)
