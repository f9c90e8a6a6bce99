"""Proto3 JSON output, like ``json_format.MessageToDict(always_print_fields_with_no_presence=True)``
but about 5x faster: a per-message-type plan of (field, JSON name, converter) built once from the
descriptor. Well-known types (Timestamp, Duration, Struct, wrappers, Any...) are left to ``json_format``.
``tests/gateway/test_jsonenc.py`` checks it against ``json_format`` on every message type of the API.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

_WKT_PACKAGE = "google.protobuf."
_PLANS: dict[str, list[tuple[str, str, bool, int, Callable[[Any], Any]]]] = {}
_PLAIN, _REPEATED, _MAP = 0, 1, 2


def _double(value: float) -> Any:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _float(value: float) -> Any:
    return _double(value) if not math.isfinite(value) else type_checkers.ToShortestFloat(value)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _enum(field: FieldDescriptor) -> Callable[[int], Any]:
    if field.enum_type.full_name == "google.protobuf.NullValue":
        return lambda _value: None
    names = {v.number: v.name for v in field.enum_type.values}
    return lambda value: names.get(value, value)


def _identity(value: Any) -> Any:
    return value


_SCALAR: dict[int, Callable[[Any], Any]] = {
    FieldDescriptor.TYPE_INT64: str,
    FieldDescriptor.TYPE_UINT64: str,
    FieldDescriptor.TYPE_SINT64: str,
    FieldDescriptor.TYPE_FIXED64: str,
    FieldDescriptor.TYPE_SFIXED64: str,
    FieldDescriptor.TYPE_DOUBLE: _double,
    FieldDescriptor.TYPE_FLOAT: _float,
    FieldDescriptor.TYPE_BYTES: _bytes,
}


def _converter(field: FieldDescriptor) -> Callable[[Any], Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_dict
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum(field)
    return _SCALAR.get(field.type, _identity)


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _plan(descriptor: Descriptor) -> list[tuple[str, str, bool, int, Callable[[Any], Any]]]:
    plan = []
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            plan.append(
                (f.name, f.json_name, False, _MAP, _converter(f.message_type.fields_by_name["value"]))
            )
        elif f.is_repeated:
            plan.append((f.name, f.json_name, False, _REPEATED, _converter(f)))
        else:
            plan.append((f.name, f.json_name, bool(f.has_presence), _PLAIN, _converter(f)))
    _PLANS[descriptor.full_name] = plan
    return plan


def to_dict(message: Message) -> Any:
    descriptor = message.DESCRIPTOR
    name = descriptor.full_name
    if name.startswith(_WKT_PACKAGE):
        return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    plan = _PLANS.get(name) or _plan(descriptor)
    out: dict[str, Any] = {}
    for field, json_name, presence, shape, convert in plan:
        if presence and not message.HasField(field):
            continue
        value = getattr(message, field)
        if shape == _PLAIN:
            out[json_name] = convert(value)
        elif shape == _REPEATED:
            out[json_name] = [convert(v) for v in value]
        else:
            out[json_name] = {_map_key(k): convert(v) for k, v in value.items()}
    return out
