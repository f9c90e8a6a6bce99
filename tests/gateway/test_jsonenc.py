"""The fast JSON encoder against ``json_format`` on every message type of the API, fully populated."""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from gateway.descriptors import import_generated_modules
from gateway.jsonenc import to_dict

_VALUES: dict[int, list[Any]] = {
    FieldDescriptor.TYPE_DOUBLE: [1.5, -0.0, math.inf, math.nan, 1e300],
    FieldDescriptor.TYPE_FLOAT: [0.1, 3.4e38, -math.inf],
    FieldDescriptor.TYPE_INT32: [-7, 2**31 - 1],
    FieldDescriptor.TYPE_INT64: [-(2**63), 42],
    FieldDescriptor.TYPE_UINT32: [2**32 - 1],
    FieldDescriptor.TYPE_UINT64: [2**64 - 1],
    FieldDescriptor.TYPE_BOOL: [True],
    FieldDescriptor.TYPE_STRING: ["héllo ✓", ""],
    FieldDescriptor.TYPE_BYTES: [b"\x00\xff binary", b""],
}


def _fill(message: Any, depth: int, variant: int) -> None:
    for f in message.DESCRIPTOR.fields:
        if (
            f.containing_oneof is not None
            and f.containing_oneof.fields[variant % len(f.containing_oneof.fields)] != f
        ):
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for i in range(2):
                key = (
                    True
                    if key_f.type == FieldDescriptor.TYPE_BOOL
                    else (f"k{i}" if key_f.type == FieldDescriptor.TYPE_STRING else i)
                )
                if value_f.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth > 0:
                        _fill(getattr(message, f.name)[key], depth - 1, variant)
                else:
                    getattr(message, f.name)[key] = _scalar(value_f, i + variant)
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth <= 0:
                continue
            name = f.message_type.full_name
            targets = (
                [getattr(message, f.name).add() for _ in range(2)]
                if f.is_repeated
                else [getattr(message, f.name)]
            )
            for target in targets:
                if name == "google.protobuf.Timestamp":
                    target.FromSeconds(1_790_000_000 + variant)
                    target.nanos = 5_000_000 * variant
                elif name == "google.protobuf.Duration":
                    target.seconds, target.nanos = 90, 500_000_000
                elif name.startswith("google.protobuf."):
                    continue
                elif name == "google.rpc.BadRequest.FieldViolation" or not name.startswith("google."):
                    _fill(target, depth - 1, variant)
            if not f.is_repeated and not targets[0].ListFields() and name.startswith("google.protobuf."):
                message.ClearField(f.name)
            continue
        if f.is_repeated:
            getattr(message, f.name).extend(_scalar(f, i + variant) for i in range(2))
        else:
            setattr(message, f.name, _scalar(f, variant))


def _scalar(f: FieldDescriptor, i: int) -> Any:
    if f.type == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in f.enum_type.values]
        return numbers[i % len(numbers)]
    values = _VALUES.get(f.type) or _VALUES[FieldDescriptor.TYPE_INT32]
    return values[i % len(values)]


def _messages() -> list[Descriptor]:
    out = {}
    for name in import_generated_modules():
        module = importlib.import_module(name)

        def walk(d: Descriptor) -> None:
            if not d.GetOptions().map_entry:
                out[d.full_name] = d
            for nested in d.nested_types:
                walk(nested)

        for d in module.DESCRIPTOR.message_types_by_name.values():
            walk(d)
    return [out[k] for k in sorted(out)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("descriptor", _messages(), ids=lambda d: d.full_name)
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_matches_json_format(descriptor: Descriptor, variant: int) -> None:
    cls = message_factory.GetMessageClass(descriptor)
    for message in (cls(), _populated(cls, variant)):
        expected = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
        assert _same(to_dict(message), expected), (to_dict(message), expected)


def _populated(cls: Any, variant: int) -> Any:
    message = cls()
    _fill(message, 3, variant)
    return message
