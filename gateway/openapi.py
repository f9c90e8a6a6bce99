"""An OpenAPI 3.0 document generated from the same descriptors and routes the bridge serves.

Schemas follow the proto3 JSON mapping: lowerCamelCase property names, 64-bit integers as decimal
strings, enums by name, bytes as base64, ``Timestamp`` as RFC 3339, ``Duration`` as ``"1.5s"``, maps as
objects; unknown properties are rejected (``additionalProperties: false``), as the bridge rejects them.
Streaming responses are documented as NDJSON (``{"result": ...}`` / ``{"error": Status}`` per line) and
server-sent events; streaming requests as a JSON array or NDJSON of messages.

Descriptions come from the proto comments. The ``_pb2`` modules the routes are read from carry no
source info (protoc strips it from their embedded descriptors), so the comments are read from the
descriptor set that ``make protos`` writes beside the stubs (``gen/cbec.binpb``, built with
``--include_source_info``) and matched by full name; without it the document has no descriptions.
``google.api.field_behavior`` marks properties: REQUIRED in the schema's ``required``, OUTPUT_ONLY
``readOnly``, INPUT_ONLY ``writeOnly``; deprecated fields, messages and methods are ``deprecated``.
Each operation's request example is read from ``openapi_examples.json`` (keyed by route: ``POST
/v1/risk/score``), which tests/gateway/test_openapi_examples.py parses and sends to a running suite.
The error reasons per status come from ``services.runtime.error_catalogue`` (also docs/errors.md).
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from services.runtime.error_catalogue import CATALOGUE, DOC_PATH

from .descriptors import Route, RouteTable, field_by_path
from .transcode import SCALAR_WKT

log = logging.getLogger("cbec.gateway")
DESCRIPTOR_SET_NAME = "cbec.binpb"
EXAMPLES_PATH = Path(__file__).with_name("openapi_examples.json")

REF = "#/components/schemas/"
_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "string", "format": "int64", "pattern": r"^-?[0-9]{1,19}$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": r"^[0-9]{1,20}$"}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]{1,12}(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.FloatValue": {"type": "number"},
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
_ERROR_RESPONSES = {
    "400": "Invalid request (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE)",
    "401": "Missing or invalid credentials (UNAUTHENTICATED)",
    "403": "Credentials lack the scope (PERMISSION_DENIED)",
    "404": "Not found (NOT_FOUND)",
    "405": "Method not allowed on this path; see Allow",
    "408": "Request body not received in time (DEADLINE_EXCEEDED, reason BODY_TIMEOUT)",
    "413": "Request body over the limit (INVALID_ARGUMENT naming the limit)",
    "429": "Rate limit, fair share or capacity exceeded (RESOURCE_EXHAUSTED); see Retry-After",
    "431": "Request header fields too large or too many",
    "503": "Backend unavailable (UNAVAILABLE); see Retry-After",
    "504": "Deadline exceeded (DEADLINE_EXCEEDED)",
}


# --- proto comments ---------------------------------------------------------------------------------
# Field numbers inside FileDescriptorProto / DescriptorProto / ... that SourceCodeInfo paths use.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)\.\s")


def find_descriptor_set() -> Path | None:
    """The descriptor set written beside the ``cbec`` stubs (``gen/cbec.binpb``, or inside the package)."""
    import cbec

    for base in cbec.__path__:
        for candidate in (Path(base).parent / DESCRIPTOR_SET_NAME, Path(base) / DESCRIPTOR_SET_NAME):
            if candidate.is_file():
                return candidate
    return None


def load_comments(path: Path | None = None) -> dict[str, str]:
    """Each commented element's comment by full name: ``pkg.Message``, ``pkg.Message.field``,
    ``pkg.Message.oneof``, ``pkg.Enum``, ``pkg.Enum.VALUE``, ``pkg.Service``, ``pkg.Service.Method``.
    Empty (with a warning) when there is no descriptor set or it was built without source info."""
    path = path or find_descriptor_set()
    if path is None:
        log.warning(
            "no %s beside the cbec stubs: the OpenAPI document has no descriptions", DESCRIPTOR_SET_NAME
        )
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    comments: dict[str, str] = {}
    for f in files:
        _file_comments(f, comments)
    if not any(f.HasField("source_code_info") for f in files):
        log.warning("%s has no source info (protoc --include_source_info): no descriptions", path)
    return comments


def _file_comments(f: descriptor_pb2.FileDescriptorProto, out: dict[str, str]) -> None:
    text: dict[tuple[int, ...], str] = {}
    for loc in f.source_code_info.location:
        comment = _clean(loc.leading_comments or loc.trailing_comments)
        if comment:
            text[tuple(loc.path)] = comment
    prefix = f"{f.package}." if f.package else ""

    def put(name: str, path: tuple[int, ...]) -> None:
        if path in text:
            out[name] = text[path]

    def enum(e: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]) -> None:
        put(name, path)
        for i, v in enumerate(e.value):
            put(f"{name}.{v.name}", (*path, _ENUM_VALUE, i))

    def message(m: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]) -> None:
        put(name, path)
        for i, fd in enumerate(m.field):
            put(f"{name}.{fd.name}", (*path, _MESSAGE_FIELD, i))
        for i, o in enumerate(m.oneof_decl):
            put(f"{name}.{o.name}", (*path, _MESSAGE_ONEOF, i))
        for i, n in enumerate(m.nested_type):
            message(n, f"{name}.{n.name}", (*path, _MESSAGE_NESTED, i))
        for i, e in enumerate(m.enum_type):
            enum(e, f"{name}.{e.name}", (*path, _MESSAGE_ENUM, i))

    for i, m in enumerate(f.message_type):
        message(m, prefix + m.name, (_FILE_MESSAGE, i))
    for i, e in enumerate(f.enum_type):
        enum(e, prefix + e.name, (_FILE_ENUM, i))
    for i, s in enumerate(f.service):
        put(prefix + s.name, (_FILE_SERVICE, i))
        for j, method in enumerate(s.method):
            put(f"{prefix}{s.name}.{method.name}", (_FILE_SERVICE, i, _SERVICE_METHOD, j))


def _clean(comment: str) -> str:
    """``// text`` lines as protoc hands them over (each with its leading space) -> the text."""
    return textwrap.dedent(comment).strip()


def _summary(comment: str) -> str:
    """The comment's first sentence (an operation's one-line summary)."""
    flat = " ".join(comment.split())
    end = _SENTENCE_END.search(flat)
    return flat if end is None else flat[: end.start() + 1]


def field_behaviors(f: FieldDescriptor) -> frozenset[int]:
    """The field's ``google.api.field_behavior`` values (none when the proto declares none)."""
    options = f.GetOptions()
    return frozenset(options.Extensions[field_behavior_pb2.field_behavior])


# --- request examples -------------------------------------------------------------------------------
def load_examples(path: Path = EXAMPLES_PATH) -> dict[str, dict[str, Any]]:
    """Example requests by route label (``POST /v1/risk/score``): ``body`` (the HTTP body: an object, or
    a list of messages for a client stream), ``path`` (path variables), ``query`` (query parameters)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {label: example for label, example in data.items() if not label.startswith("$")}


class SchemaBuilder:
    def __init__(self, comments: Mapping[str, str] | None = None) -> None:
        self.schemas: dict[str, Any] = {}
        self.comments: Mapping[str, str] = comments or {}

    def message_ref(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WKT:
            return dict(_WKT[message.full_name])
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder: recursion-safe
            self.schemas[message.full_name] = self._message_schema(message)
        return {"$ref": REF + message.full_name}

    def _message_schema(self, message: Descriptor, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        properties = {}
        required = []
        for f in message.fields:
            if f.name in exclude:
                continue
            properties[f.json_name] = self.property_schema(f)
            if field_behavior_pb2.REQUIRED in field_behaviors(f):
                required.append(f.json_name)
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema["required"] = required
        if message.GetOptions().deprecated:
            schema["deprecated"] = True
        notes = [self.comments.get(message.full_name, "")]
        oneofs = [
            o
            for o in message.oneofs
            if not (len(o.fields) == 1 and o.fields[0].has_presence and o.name.startswith("_"))
        ]
        for o in oneofs:
            members = ", ".join(f.json_name for f in o.fields)
            comment = self.comments.get(f"{message.full_name}.{o.name}", "")
            notes.append(f"At most one of {members}." + (f" {comment}" if comment else ""))
        description = "\n\n".join(n for n in notes if n)
        if description:
            schema["description"] = description
        return schema

    def property_schema(self, f: FieldDescriptor) -> dict[str, Any]:
        """A field's schema with its comment, its enum values and its field behaviour."""
        schema = self.field_schema(f)
        extra: dict[str, Any] = {}
        description = self.field_description(f)
        if description:
            extra["description"] = description
        behaviors = field_behaviors(f)
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            extra["readOnly"] = True
        if field_behavior_pb2.INPUT_ONLY in behaviors:
            extra["writeOnly"] = True
        if f.GetOptions().deprecated:
            extra["deprecated"] = True
        if not extra:
            return schema
        if "$ref" in schema:  # OpenAPI 3.0 ignores a $ref's siblings
            return {"allOf": [schema], **extra}
        return {**schema, **extra}

    def field_description(self, f: FieldDescriptor) -> str:
        parts = [self.comments.get(f.full_name, "")]
        enum = f.enum_type
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            enum = f.message_type.fields_by_name["value"].enum_type
        if enum is not None:
            parts.append(self.enum_description(enum))
        return "\n\n".join(p for p in parts if p)

    def enum_description(self, enum: EnumDescriptor) -> str:
        """The enum's comment, then each value with its comment."""
        lines = []
        for v in enum.values:
            comment = " ".join(self.comments.get(f"{enum.full_name}.{v.name}", "").split())
            lines.append(f"- `{v.name}`" + (f": {comment}" if comment else ""))
        head = self.comments.get(enum.full_name, "")
        return "\n\n".join(p for p in (head, "\n".join(lines)) if p)

    def body_schema(self, message: Descriptor, exclude: frozenset[str]) -> dict[str, Any]:
        if not exclude:
            return self.message_ref(message)
        return self._message_schema(message, exclude)

    def field_schema(self, f: FieldDescriptor, ignore_label: bool = False) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.field_schema(value)}
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            single = self.message_ref(f.message_type)
        elif f.type == FieldDescriptor.TYPE_ENUM:
            single = {"type": "string", "enum": [v.name for v in f.enum_type.values]}
        else:
            single = dict(_SCALARS[f.type])
        if f.is_repeated and not ignore_label:
            return {"type": "array", "items": single}
        return single


def _query_parameters(
    builder: SchemaBuilder, message: Descriptor, skip: set[str], prefix: str = "", depth: int = 0
) -> list[dict[str, Any]]:
    params = []
    for f in message.fields:
        name = prefix + f.json_name
        if f.name in skip and not prefix:
            continue
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        if f.type == FieldDescriptor.TYPE_MESSAGE and not is_map and f.message_type.full_name not in _WKT:
            if not f.is_repeated and depth < 3:
                params += _query_parameters(builder, f.message_type, skip, name + ".", depth + 1)
            continue
        if is_map or (f.message_type is not None and f.message_type.full_name not in SCALAR_WKT):
            continue
        schema = builder.field_schema(f)
        required = not prefix and field_behavior_pb2.REQUIRED in field_behaviors(f)
        param: dict[str, Any] = {"name": name, "in": "query", "required": required, "schema": schema}
        description = builder.field_description(f)
        if description:
            param["description"] = description
        if f.GetOptions().deprecated:
            param["deprecated"] = True
        if schema.get("type") == "array":
            param["style"] = "form"
            param["explode"] = True
        params.append(param)
    return params


def _operation(
    route: Route, builder: SchemaBuilder, backends: list[str], example: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    info = route.method
    message = info.method.input_type
    example = example or {}
    params: list[dict[str, Any]] = []
    bound_top = set()
    for var in route.template.variables:
        chain = field_by_path(message, var)
        bound_top.add(chain[0].name)
        schema = builder.field_schema(chain[-1], ignore_label=True)
        if var == info.routing_field:
            schema = {"type": "string", "enum": backends}
        elif schema.get("type") == "string" and "pattern" not in schema and "format" not in schema:
            schema = {**schema, "minLength": 1}
        param: dict[str, Any] = {"name": var, "in": "path", "required": True, "schema": schema}
        description = builder.field_description(chain[-1])
        if description:
            param["description"] = description
        params.append(param)
    if route.body == "":
        params += _query_parameters(builder, message, bound_top)
    elif route.body != "*":
        params += _query_parameters(builder, message, bound_top | {route.body})
    for param in params:
        value = example.get(param["in"], {}).get(param["name"])
        if value is not None:
            param["example"] = value
    kind = info.kind.replace("_", " ")
    comment = builder.comments.get(f"{info.service.full_name}.{info.name}", "")
    about = (
        f"gRPC `{info.path}` ({kind}); scope `{info.scope}`; "
        f"{'safe' if info.idempotent else 'not safe'} to retry."
    )
    operation: dict[str, Any] = {
        "operationId": f"{info.service.name}_{info.name}",
        "tags": [info.service.full_name],
        "summary": _summary(comment) if comment else f"{info.service.full_name}.{info.name} ({kind})",
        "description": f"{comment}\n\n{about}" if comment else about,
        **({"deprecated": True} if info.method.GetOptions().deprecated else {}),
        "x-grpc-method": info.path,
        "x-idempotent": info.idempotent,
        "x-required-scope": info.scope,
        "parameters": params,
    }
    if route.body:
        if route.body == "*":
            body = builder.body_schema(message, frozenset(bound_top))
        else:
            body = builder.field_schema(message.fields_by_name[route.body])
        if info.client_streaming:
            content = {
                "application/json": {"schema": {"type": "array", "items": body}},
                "application/x-ndjson": {"schema": body},
            }
            if isinstance(example.get("body"), list) and example["body"]:
                content["application/json"]["example"] = example["body"]
                content["application/x-ndjson"]["example"] = example["body"][0]
        else:
            content = {"application/json": {"schema": body}}
            if "body" in example:
                content["application/json"]["example"] = example["body"]
        operation["requestBody"] = {"required": False, "content": content}
    if route.response_body:
        result = builder.field_schema(info.method.output_type.fields_by_name[route.response_body])
    else:
        result = builder.message_ref(info.method.output_type)
    if info.server_streaming:
        ok = {
            "description": 'A stream: one JSON object per line, {"result": message} or a final'
            ' {"error": Status} (or server-sent events with Accept: text/event-stream)',
            "content": {
                "application/x-ndjson": {
                    "schema": {
                        "type": "object",
                        "properties": {"result": result, "error": {"$ref": REF + "google.rpc.Status"}},
                        "additionalProperties": False,
                    }
                },
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": result}}}
    responses: dict[str, Any] = {"200": ok}
    for status in _ERROR_RESPONSES:
        responses[status] = {"$ref": f"#/components/responses/E{status}"}
    responses["default"] = {"$ref": "#/components/responses/Error"}
    operation["responses"] = responses
    return operation


def _reasons_by_status() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for entry in CATALOGUE:
        out.setdefault(str(entry.http_status), []).append(entry.reason)
    return {status: sorted(reasons) for status, reasons in out.items()}


def build_openapi(
    routes: RouteTable,
    backends: list[str],
    title: str = "cbec-ai gateway",
    comments: Mapping[str, str] | None = None,
    examples: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The document; ``comments`` and ``examples`` default to the descriptor set's and the examples file's."""
    builder = SchemaBuilder(load_comments() if comments is None else comments)
    examples = load_examples() if examples is None else examples
    paths: dict[str, Any] = {}
    for route in sorted(routes.routes, key=lambda r: (r.template.openapi_path, r.http_method)):
        path = paths.setdefault(route.template.openapi_path, {})
        method = route.http_method.lower()
        if method in path:  # an additional binding with the same verb and path: keep the first
            continue
        path[method] = _operation(route, builder, backends, examples.get(route.label))
    builder.schemas["google.rpc.Status"] = {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": _WKT["google.protobuf.Any"]},
        },
        "required": ["code", "message"],
    }
    error_content = {"application/json": {"schema": {"$ref": REF + "google.rpc.Status"}}}
    reasons = _reasons_by_status()
    responses: dict[str, Any] = {
        f"E{status}": {
            "description": _with_reasons(description, reasons.get(status, ())),
            "content": error_content,
        }
        for status, description in _ERROR_RESPONSES.items()
    }
    others = sorted(r for status, listed in reasons.items() if status not in _ERROR_RESPONSES for r in listed)
    responses["Error"] = {
        "description": _with_reasons("Any other error: a google.rpc.Status", others),
        "content": error_content,
    }
    for key in ("E429", "E503"):
        responses[key]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": "v1",
            "description": "HTTP/JSON bridge to the cbec-ai gRPC services, generated from their "
            "google.api.http annotations. JSON follows the proto3 JSON mapping. Errors are google.rpc.Status "
            "objects. Send an API key in x-api-key or a JWT as a Bearer token; a request id in "
            "X-Request-Id (returned on every response); an optional deadline in grpc-timeout (e.g. 500m). "
            "Every google.rpc.ErrorInfo reason, with its domain, status and what a client should do, is "
            f"listed in {DOC_PATH} of the cbec-ai repository.",
        },
        "tags": _tags(routes, builder.comments),
        "paths": paths,
        "components": {
            "schemas": dict(sorted(builder.schemas.items())),
            "responses": responses,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "Bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
        "security": [{"ApiKey": []}, {"Bearer": []}],
    }


def _with_reasons(description: str, reasons: Iterable[str]) -> str:
    listed = ", ".join(reasons)
    return f"{description}. ErrorInfo reasons: {listed}" if listed else description


def _tags(routes: RouteTable, comments: Mapping[str, str]) -> list[dict[str, str]]:
    tags = []
    services = {r.method.service.full_name: r.method.service for r in routes.routes}
    for service in sorted(services.values(), key=lambda s: s.full_name):
        tag = {"name": service.full_name}
        if comments.get(service.full_name):
            tag["description"] = comments[service.full_name]
        tags.append(tag)
    return tags
