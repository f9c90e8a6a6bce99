"""An OpenAPI 3.0 document generated from the same descriptors and routes the bridge serves.

Schemas follow the proto3 JSON mapping: lowerCamelCase property names, 64-bit integers as decimal
strings, enums by name, bytes as base64, ``Timestamp`` as RFC 3339, ``Duration`` as ``"1.5s"``, maps as
objects; unknown properties are rejected (``additionalProperties: false``), as the bridge rejects them.
Streaming responses are documented as NDJSON (``{"result": ...}`` / ``{"error": Status}`` per line) and
server-sent events; streaming requests as a JSON array or NDJSON of messages.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .descriptors import Route, RouteTable, field_by_path
from .transcode import SCALAR_WKT

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


class SchemaBuilder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def message_ref(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WKT:
            return dict(_WKT[message.full_name])
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder: recursion-safe
            self.schemas[message.full_name] = self._message_schema(message)
        return {"$ref": REF + message.full_name}

    def _message_schema(self, message: Descriptor, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        properties = {}
        for f in message.fields:
            if f.name in exclude:
                continue
            properties[f.json_name] = self.field_schema(f)
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        oneofs = [
            o
            for o in message.oneofs
            if not (len(o.fields) == 1 and o.fields[0].has_presence and o.name.startswith("_"))
        ]
        if oneofs:
            schema["description"] = "; ".join(
                f"at most one of {', '.join(f.json_name for f in o.fields)}" for o in oneofs
            )
        return schema

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
        param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
        if schema.get("type") == "array":
            param["style"] = "form"
            param["explode"] = True
        params.append(param)
    return params


def _operation(route: Route, builder: SchemaBuilder, backends: list[str]) -> dict[str, Any]:
    info = route.method
    message = info.method.input_type
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
        params.append({"name": var, "in": "path", "required": True, "schema": schema})
    if route.body == "":
        params += _query_parameters(builder, message, bound_top)
    elif route.body != "*":
        params += _query_parameters(builder, message, bound_top | {route.body})
    operation: dict[str, Any] = {
        "operationId": f"{info.service.name}_{info.name}",
        "tags": [info.service.full_name],
        "summary": f"{info.service.full_name}.{info.name} ({info.kind.replace('_', ' ')})",
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
        else:
            content = {"application/json": {"schema": body}}
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


def build_openapi(routes: RouteTable, backends: list[str], title: str = "cbec-ai gateway") -> dict[str, Any]:
    builder = SchemaBuilder()
    paths: dict[str, Any] = {}
    for route in sorted(routes.routes, key=lambda r: (r.template.openapi_path, r.http_method)):
        path = paths.setdefault(route.template.openapi_path, {})
        method = route.http_method.lower()
        if method in path:  # an additional binding with the same verb and path: keep the first
            continue
        path[method] = _operation(route, builder, backends)
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
    responses: dict[str, Any] = {
        f"E{status}": {"description": description, "content": error_content}
        for status, description in _ERROR_RESPONSES.items()
    }
    responses["Error"] = {"description": "Any other error: a google.rpc.Status", "content": error_content}
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
            "X-Request-Id (returned on every response); an optional deadline in grpc-timeout (e.g. 500m).",
        },
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
