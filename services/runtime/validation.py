"""Contract limits, checked once in the runtime on every request before a servicer sees it.

What is checked comes from the protobuf descriptors: the ``(cbec.common.v1.limits)`` field option
(``protos/cbec/common/v1/options.proto``) where a field declares one, else the defaults below, so
every string, bytes, repeated and map field is bounded and every ``Timestamp`` is in a sane range:

- strings: at most ``max_len`` characters, no C0/C1 control characters (tab, newline and carriage
  return are allowed), not empty when ``required`` (a repeated string: no empty element);
- bytes: at most ``max_len`` bytes; repeated and map fields: at most ``max_items`` elements (a map's
  ``max_len`` bounds its string keys and values);
- ``google.protobuf.Timestamp``: nanos in [0, 1e9) and seconds within ``min_unix_s``..``max_unix_s``
  (default 1970-01-01 .. 2100-01-01); ``google.protobuf.Duration``: protobuf's own range and signs;
- enums: a value the enum defines.

A violation is an INVALID_ARGUMENT naming the field path (``transactions[3].occurred_time``) and the
limit. The rules of a message type are compiled once into a table keyed by field descriptor, and a
message is walked with ``ListFields()``, so unset fields cost nothing.

Written here rather than taken from protovalidate (``buf.validate``), the field's standard: its
current Python release (2.x) validates messages of Buf's own ``protobuf-py`` runtime, not the
``google.protobuf`` messages grpcio hands a servicer; its 1.x line interprets CEL in pure Python
(cel-python) on every message, far more per call than these few fixed rules (measured here: 0.1 to
5 us for a typical request); and ``buf/validate/validate.proto`` comes from the Buf registry, which
the offline build cannot reach. The rules live in the contract's own option instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cbec.common.v1 import options_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from .errors import InvalidArgument, Violation, quote

DEFAULT_MAX_CHARS = 1024
DEFAULT_MAX_BYTES = 64 * 1024
DEFAULT_MAX_ITEMS = 1000
DEFAULT_MIN_UNIX_S = 0  # 1970-01-01T00:00:00Z
DEFAULT_MAX_UNIX_S = 4_102_444_800  # 2100-01-01T00:00:00Z
#: google.protobuf.Duration's documented range (about 10,000 years).
DURATION_MAX_S = 315_576_000_000
NANOS = 1_000_000_000
#: C0 and C1 control characters and DEL, except tab, newline and carriage return.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

_T = FieldDescriptor
# Checks one value; ``path`` is the field's path. Returns nothing; appends to ``out``.
_Check = Callable[[Any, str, list[Violation]], None]
# Checks one element of a repeated field or map value: a description of the problem, or None.
_Problem = Callable[[Any], str | None]


class _Rules:
    """The compiled rules of one message type."""

    __slots__ = ("fields", "required")

    def __init__(self) -> None:
        self.fields: dict[FieldDescriptor, tuple[str, _Check]] = {}
        self.required: tuple[str, ...] = ()


_compiled: dict[str, _Rules] = {}
_by_type: dict[type, _Rules] = {}


def violations(message: Message, prefix: str = "") -> list[Violation]:
    """Every contract violation of ``message`` (field paths start with ``prefix``)."""
    out: list[Violation] = []
    _check_message(message, prefix, out, rules_for(message.DESCRIPTOR))
    return out


def validate(message: Message, prefix: str = "") -> None:
    """Raise INVALID_ARGUMENT naming every field of ``message`` that breaks the contract's limits."""
    rules = _by_type.get(type(message))
    if rules is None:  # first call of this type; not a message (raw bytes): nothing to check
        descriptor = getattr(message, "DESCRIPTOR", None)
        rules = rules_for(descriptor) if isinstance(descriptor, Descriptor) else _Rules()
        _by_type[type(message)] = rules
    if not rules.fields and not rules.required:
        return
    out: list[Violation] = []
    _check_message(message, prefix, out, rules)
    if out:
        raise InvalidArgument(out)


def rules_for(descriptor: Descriptor) -> _Rules:
    """The rules of a message type, compiled on first use and cached (recursive types included)."""
    rules = _compiled.get(descriptor.full_name)
    if rules is None:
        rules = _compiled[descriptor.full_name] = _Rules()
        required = []
        try:
            for fd in descriptor.fields:
                limits = _limits(fd)
                check = _field_check(fd, limits)
                if check is not None:
                    rules.fields[fd] = (fd.name, check)
                # (not in a oneof: "required" could not tell unset from another member being set)
                if (
                    limits.required
                    and fd.type == _T.TYPE_STRING
                    and not fd.is_repeated
                    and fd.containing_oneof is None
                ):
                    required.append(fd.name)
        except BaseException:
            del _compiled[descriptor.full_name]  # never keep half a rule table
            raise
        rules.required = tuple(required)
    return rules


def _check_message(message: Message, prefix: str, out: list[Violation], rules: _Rules) -> None:
    for name in rules.required:
        if not getattr(message, name).strip():
            out.append(Violation(prefix + name, "is required (must not be empty)"))
    fields = rules.fields
    for fd, value in message.ListFields():
        entry = fields.get(fd)
        if entry is not None:
            entry[1](value, prefix + entry[0], out)


def _limits(fd: FieldDescriptor) -> options_pb2.FieldLimits:
    options = fd.GetOptions()
    if options.HasExtension(options_pb2.limits):
        return options.Extensions[options_pb2.limits]
    return options_pb2.FieldLimits()


# --- compiling one field ----------------------------------------------------------------------------
def _field_check(fd: FieldDescriptor, limits: options_pb2.FieldLimits) -> _Check | None:
    if fd.is_repeated:
        if fd.type == _T.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            return _map_check(fd, limits)
        return _repeated_check(fd, limits)
    if fd.type == _T.TYPE_MESSAGE:
        problem = _well_known(fd.message_type, limits)
        if problem is not None:
            return _singular(problem)
        return _nested(fd.message_type)
    if fd.type == _T.TYPE_STRING:
        return _string_check(limits.max_len or DEFAULT_MAX_CHARS)
    problem = _scalar(fd, limits)
    return _singular(problem) if problem is not None else None


def _string_check(max_len: int) -> _Check:
    """The commonest field, checked without the extra call of ``_singular``."""
    search = CONTROL.search
    problem = _string_problem(max_len)

    def check(value: str, path: str, out: list[Violation]) -> None:
        if len(value) > max_len or search(value) is not None:
            out.append(Violation(path, problem(value) or ""))

    return check


def _singular(problem: _Problem) -> _Check:
    def check(value: Any, path: str, out: list[Violation]) -> None:
        description = problem(value)
        if description is not None:
            out.append(Violation(path, description))

    return check


def _nested(descriptor: Descriptor) -> _Check:
    rules = rules_for(descriptor)  # a type being compiled (recursion) is filled in before first use

    def check(value: Any, path: str, out: list[Violation]) -> None:
        _check_message(value, path + ".", out, rules)

    return check


def _repeated_check(fd: FieldDescriptor, limits: options_pb2.FieldLimits) -> _Check:
    max_items = limits.max_items or DEFAULT_MAX_ITEMS
    element: _Problem | None
    nested: Descriptor | None = None
    if fd.type == _T.TYPE_MESSAGE:
        element = _well_known(fd.message_type, limits)
        nested = fd.message_type if element is None else None
    else:
        element = _scalar(fd, limits)
        if limits.required and fd.type == _T.TYPE_STRING:
            element = _required_element(element)
    rules = rules_for(nested) if nested is not None else None

    def check(values: Any, path: str, out: list[Violation]) -> None:
        n = len(values)
        if n > max_items:
            out.append(Violation(path, f"must hold at most {max_items} items (got {n})"))
            return
        if rules is not None:
            for i, value in enumerate(values):
                _check_message(value, f"{path}[{i}].", out, rules)
        elif element is not None:
            for i, value in enumerate(values):
                description = element(value)
                if description is not None:
                    out.append(Violation(f"{path}[{i}]", description))

    return check


def _required_element(inner: _Problem | None) -> _Problem:
    def problem(value: str) -> str | None:
        if not value.strip():
            return "must not be empty"
        return inner(value) if inner is not None else None

    return problem


def _map_check(fd: FieldDescriptor, limits: options_pb2.FieldLimits) -> _Check:
    max_items = limits.max_items or DEFAULT_MAX_ITEMS
    entry = fd.message_type
    key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
    key_problem = _scalar(key_fd, limits)
    nested: Descriptor | None = None
    if value_fd.type == _T.TYPE_MESSAGE:
        value_problem = _well_known(value_fd.message_type, limits)
        nested = value_fd.message_type if value_problem is None else None
    else:
        value_problem = _scalar(value_fd, limits)
    rules = rules_for(nested) if nested is not None else None

    def check(mapping: Any, path: str, out: list[Violation]) -> None:
        n = len(mapping)
        if n > max_items:
            out.append(Violation(path, f"must hold at most {max_items} entries (got {n})"))
            return
        for key, value in mapping.items():
            if key_problem is not None and (description := key_problem(key)) is not None:
                out.append(Violation(f"{path}[{quote(key, 32)}]", f"key {description}"))
                continue
            if rules is not None:
                _check_message(value, f"{path}[{quote(key, 32)}].", out, rules)
            elif value_problem is not None and (description := value_problem(value)) is not None:
                out.append(Violation(f"{path}[{quote(key, 32)}]", description))

    return check


def _scalar(fd: FieldDescriptor, limits: options_pb2.FieldLimits) -> _Problem | None:
    if fd.type == _T.TYPE_STRING:
        return _string_problem(limits.max_len or DEFAULT_MAX_CHARS)
    if fd.type == _T.TYPE_BYTES:
        return _bytes_problem(limits.max_len or DEFAULT_MAX_BYTES)
    if fd.type == _T.TYPE_ENUM:
        return _enum_problem(fd)
    return None


def _string_problem(max_len: int) -> _Problem:
    search = CONTROL.search

    def problem(value: str) -> str | None:
        if len(value) > max_len:
            return f"must be at most {max_len} characters (got {len(value)})"
        bad = search(value)
        if bad is not None:
            return f"must not contain control characters (U+{ord(bad.group()):04X} at position {bad.start()})"
        return None

    return problem


def _bytes_problem(max_len: int) -> _Problem:
    def problem(value: bytes) -> str | None:
        if len(value) > max_len:
            return f"must be at most {max_len} bytes (got {len(value)})"
        return None

    return problem


def _enum_problem(fd: FieldDescriptor) -> _Problem:
    enum = fd.enum_type
    defined = frozenset(enum.values_by_number)

    def problem(value: int) -> str | None:
        if value not in defined:
            return f"{value} is not a value of {enum.name}"
        return None

    return problem


def _well_known(descriptor: Descriptor, limits: options_pb2.FieldLimits) -> _Problem | None:
    if descriptor.full_name == "google.protobuf.Timestamp":
        return _timestamp_problem(
            limits.min_unix_s or DEFAULT_MIN_UNIX_S, limits.max_unix_s or DEFAULT_MAX_UNIX_S
        )
    if descriptor.full_name == "google.protobuf.Duration":
        return _duration_problem
    return None


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timestamp_problem(min_s: int, max_s: int) -> _Problem:
    bounds = f"must be between {_iso(min_s)} and {_iso(max_s)}"

    def problem(value: Any) -> str | None:
        if not 0 <= value.nanos < NANOS:
            return f"nanos must be within 0..999999999 (got {value.nanos})"
        if not min_s <= value.seconds <= max_s:
            return f"{bounds} (got {value.seconds} s since the epoch)"
        return None

    return problem


def _duration_problem(value: Any) -> str | None:
    seconds, nanos = value.seconds, value.nanos
    if not -DURATION_MAX_S <= seconds <= DURATION_MAX_S:
        return f"seconds must be within -{DURATION_MAX_S}..{DURATION_MAX_S} (got {seconds})"
    if not -NANOS < nanos < NANOS or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        return f"nanos must be within -999999999..999999999 with the sign of seconds (got {nanos})"
    return None
