"""Contract rules, checked once in the runtime on every request before a servicer sees it.

What is checked comes from the protobuf descriptors: the ``(cbec.common.v1.limits)`` field option
(``protos/cbec/common/v1/options.proto``) where a field declares one, else the defaults below, so
every string, bytes, repeated and map field is bounded and every ``Timestamp`` is in a sane range:

- strings: at most ``max_len`` characters, no C0/C1 control characters (tab, newline and carriage
  return are allowed);
- bytes: at most ``max_len`` bytes; repeated and map fields: at most ``max_items`` elements (a map's
  ``max_len`` bounds its string keys and values);
- ``google.protobuf.Timestamp``: nanos in [0, 1e9) and seconds within ``min_unix_s``..``max_unix_s``
  (default 1970-01-01 .. 2100-01-01); ``google.protobuf.Duration``: protobuf's own range and signs;
  ``google.type.Money``: a currency code of three capital letters (ISO 4217's form), nanos within
  +-999,999,999 with the sign of units;
- enums: a value the enum defines.

And the fields the contract marks ``(google.api.field_behavior) = REQUIRED``, in the request and in
every message set in it (elements of repeated fields included):

- a string must not be empty or blank, a bytes field not empty;
- a message field (or any field with presence) must be set;
- a repeated or map field must hold at least one element (a repeated string or bytes field: and
  none of them empty or blank);
- a number or enum must not be 0. Proto3 cannot tell an unset number from 0, so the contract marks a
  number REQUIRED only where 0 is invalid anyway (``k``, ``outcome``, an enum's UNSPECIFIED).

``IDENTIFIER`` and ``OUTPUT_ONLY`` need no check here (a server ignores output-only input). The
deprecated ``(cbec.common.v1.limits).required`` is ignored: REQUIRED is the one way to say it.

A message type marked ``option (cbec.common.v1.item) = {rejected_alone: true}`` (an element of a
batch whose bad elements are rejected one by one, or one message of such a client stream) is
checked for its limits like any other, but its REQUIRED fields, and those of the messages in it, are
left to the servicer, which checks them with ``item_violations`` (the same compiled rules) and
rejects that element alone.

A violation is an INVALID_ARGUMENT naming the field path (``transactions[3].occurred_time``) and the
rule. The rules of a message type are compiled once into a table keyed by field descriptor, and a
message is walked with ``ListFields()``, so unset fields cost nothing but the REQUIRED ones' checks.

Written here rather than taken from protovalidate (``buf.validate``), the field's standard: its
current Python release (2.x) validates messages of Buf's own ``protobuf-py`` runtime, not the
``google.protobuf`` messages grpcio hands a servicer; its 1.x line interprets CEL in pure Python
(cel-python) on every message, far more per call than these few fixed rules (measured here: 0.1 to
5 us for a typical request); and ``buf/validate/validate.proto`` comes from the Buf registry, which
the offline build cannot reach. The rules live in the contract's own option instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from cbec.common.v1 import options_pb2
from google.api import field_behavior_pb2
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
#: ISO 4217's form of a currency code (whether the currency exists is the service's to say).
CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")
NANOS_MAX = 999_999_999
REQUIRED = field_behavior_pb2.REQUIRED

_T = FieldDescriptor
# Checks one set value; ``path`` is the field's path; ``required``: also check REQUIRED fields of the
# messages in it. Returns nothing; appends to ``out``.
_Check = Callable[[Any, str, list[Violation], bool], None]
# Checks one element of a repeated field or map value: a description of the problem, or None.
_Problem = Callable[[Any], str | None]
# Checks one REQUIRED field of a message (set or not); ``prefix`` is the message's path.
_Require = Callable[[Any, str, list[Violation]], None]


class _Rules:
    """The compiled rules of one message type."""

    __slots__ = ("fields", "per_item", "required")

    def __init__(self) -> None:
        self.fields: dict[FieldDescriptor, tuple[str, _Check]] = {}
        self.required: tuple[_Require, ...] = ()
        # ``(cbec.common.v1.item).rejected_alone``: REQUIRED fields are the servicer's (item_violations)
        self.per_item = False


_compiled: dict[str, _Rules] = {}
_by_type: dict[type, _Rules] = {}


def violations(message: Message, prefix: str = "") -> list[Violation]:
    """Every contract violation of ``message`` that the runtime rejects a call for (field paths start
    with ``prefix``): what ``validate`` raises."""
    out: list[Violation] = []
    rules = rules_for(message.DESCRIPTOR)
    _check_message(message, prefix, out, rules, not rules.per_item)
    return out


def validate(message: Message, prefix: str = "") -> None:
    """Raise INVALID_ARGUMENT naming every field of ``message`` that breaks the contract: its limits,
    and its REQUIRED fields unless the message is an element rejected alone (``item_violations``)."""
    rules = _by_type.get(type(message))
    if rules is None:  # first call of this type; not a message (raw bytes): nothing to check
        descriptor = getattr(message, "DESCRIPTOR", None)
        rules = rules_for(descriptor) if isinstance(descriptor, Descriptor) else _Rules()
        _by_type[type(message)] = rules
    if not rules.fields and not rules.required:
        return
    out: list[Violation] = []
    _check_message(message, prefix, out, rules, not rules.per_item)
    if out:
        raise InvalidArgument(out)


def item_violations(message: Message, prefix: str = "") -> list[Violation]:
    """Every contract violation of one element that a servicer accepts or rejects alone (a type marked
    ``(cbec.common.v1.item).rejected_alone``), its REQUIRED fields and those of the messages in it
    included: what the servicer reports in that element's ``ItemRejection``."""
    out: list[Violation] = []
    _check_message(message, prefix, out, rules_for(message.DESCRIPTOR), True)
    return out


def merged(first: Sequence[Violation], then: Iterable[Violation]) -> list[Violation]:
    """``first``, then those of ``then`` on fields that ``first`` does not name: one reason per field
    when a servicer's own checks would repeat a missing field's."""
    named = {v.field for v in first}
    return [*first, *(v for v in then if v.field not in named)]


def is_required(fd: FieldDescriptor) -> bool:
    """Whether the contract marks the field ``(google.api.field_behavior) = REQUIRED``."""
    return REQUIRED in fd.GetOptions().Extensions[field_behavior_pb2.field_behavior]


def rules_for(descriptor: Descriptor) -> _Rules:
    """The rules of a message type, compiled on first use and cached (recursive types included)."""
    rules = _compiled.get(descriptor.full_name)
    if rules is None:
        rules = _compiled[descriptor.full_name] = _Rules()
        required = []
        try:
            options = descriptor.GetOptions()
            if options.HasExtension(options_pb2.item):
                rules.per_item = bool(options.Extensions[options_pb2.item].rejected_alone)
            for fd in descriptor.fields:
                limits = _limits(fd)
                check = _field_check(fd, limits)
                if check is not None:
                    rules.fields[fd] = (fd.name, check)
                if is_required(fd):
                    required.append(_require(fd, limits))
        except BaseException:
            del _compiled[descriptor.full_name]  # never keep half a rule table
            raise
        rules.required = tuple(required)
    return rules


def _check_message(
    message: Message, prefix: str, out: list[Violation], rules: _Rules, required: bool
) -> None:
    if required:
        for check_required in rules.required:
            check_required(message, prefix, out)
    fields = rules.fields
    for fd, value in message.ListFields():
        entry = fields.get(fd)
        if entry is not None:
            entry[1](value, prefix + entry[0], out, required)


def _limits(fd: FieldDescriptor) -> options_pb2.FieldLimits:
    options = fd.GetOptions()
    if options.HasExtension(options_pb2.limits):
        return options.Extensions[options_pb2.limits]
    return options_pb2.FieldLimits()


# --- compiling one REQUIRED field ---------------------------------------------------------------------
def _require(fd: FieldDescriptor, limits: options_pb2.FieldLimits) -> _Require:
    """The check of one REQUIRED field (see the module docstring for what each kind must hold)."""
    name = fd.name
    if fd.is_repeated:  # maps included
        blank_elements = fd.type in (_T.TYPE_STRING, _T.TYPE_BYTES)
        max_items = limits.max_items or DEFAULT_MAX_ITEMS

        def repeated(message: Any, prefix: str, out: list[Violation]) -> None:
            values = getattr(message, name)
            if not values:
                out.append(Violation(prefix + name, "is required (must hold at least one item)"))
            elif blank_elements and len(values) <= max_items:  # too many: one violation, the limit's
                for i, value in enumerate(values):
                    if not value.strip():
                        out.append(Violation(f"{prefix}{name}[{i}]", "must not be empty"))

        return repeated
    if fd.has_presence:  # a message, a oneof member, a proto3 ``optional`` scalar

        def present(message: Any, prefix: str, out: list[Violation]) -> None:
            if not message.HasField(name):
                out.append(Violation(prefix + name, "is required"))

        return present
    if fd.type in (_T.TYPE_STRING, _T.TYPE_BYTES):

        def text(message: Any, prefix: str, out: list[Violation]) -> None:
            if not getattr(message, name).strip():
                out.append(Violation(prefix + name, "is required (must not be empty)"))

        return text
    zero = fd.enum_type.values_by_number[0].name if fd.type == _T.TYPE_ENUM else "0"
    description = f"is required (must not be {zero})"

    def number(message: Any, prefix: str, out: list[Violation]) -> None:
        if not getattr(message, name):
            out.append(Violation(prefix + name, description))

    return number


# --- compiling one field ----------------------------------------------------------------------------
def _field_check(fd: FieldDescriptor, limits: options_pb2.FieldLimits) -> _Check | None:
    if fd.is_repeated:
        if fd.type == _T.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            return _map_check(fd, limits)
        return _repeated_check(fd, limits)
    if fd.type == _T.TYPE_MESSAGE:
        if fd.message_type.full_name == "google.type.Money":
            return _money_check
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

    def check(value: str, path: str, out: list[Violation], required: bool) -> None:
        if len(value) > max_len or search(value) is not None:
            out.append(Violation(path, problem(value) or ""))

    return check


def _singular(problem: _Problem) -> _Check:
    def check(value: Any, path: str, out: list[Violation], required: bool) -> None:
        description = problem(value)
        if description is not None:
            out.append(Violation(path, description))

    return check


def _nested(descriptor: Descriptor) -> _Check:
    rules = rules_for(descriptor)  # a type being compiled (recursion) is filled in before first use

    def check(value: Any, path: str, out: list[Violation], required: bool) -> None:
        _check_message(value, path + ".", out, rules, required and not rules.per_item)

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
    rules = rules_for(nested) if nested is not None else None

    def check(values: Any, path: str, out: list[Violation], required: bool) -> None:
        n = len(values)
        if n > max_items:
            out.append(Violation(path, f"must hold at most {max_items} items (got {n})"))
            return
        if rules is not None:
            inner = required and not rules.per_item
            for i, value in enumerate(values):
                _check_message(value, f"{path}[{i}].", out, rules, inner)
        elif element is not None:
            for i, value in enumerate(values):
                description = element(value)
                if description is not None:
                    out.append(Violation(f"{path}[{i}]", description))

    return check


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

    def check(mapping: Any, path: str, out: list[Violation], required: bool) -> None:
        n = len(mapping)
        if n > max_items:
            out.append(Violation(path, f"must hold at most {max_items} entries (got {n})"))
            return
        inner = required and rules is not None and not rules.per_item
        for key, value in mapping.items():
            if key_problem is not None and (description := key_problem(key)) is not None:
                out.append(Violation(f"{path}[{quote(key, 32)}]", f"key {description}"))
                continue
            if rules is not None:
                _check_message(value, f"{path}[{quote(key, 32)}].", out, rules, inner)
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
    if descriptor.full_name == "google.type.Money":
        return _money_problem
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


def _money_problems(value: Any) -> list[tuple[str, str]]:
    """(sub-field, description) of each problem of a ``google.type.Money`` (its documented form)."""
    out = []
    if CURRENCY_CODE.match(value.currency_code) is None:
        out.append(
            (
                "currency_code",
                f"must be an ISO 4217 code of three capital letters such as 'EUR' "
                f"(got {quote(value.currency_code)})",
            )
        )
    units, nanos = value.units, value.nanos
    if not -NANOS_MAX <= nanos <= NANOS_MAX:
        out.append(("nanos", f"must be within -999999999..999999999 (got {nanos})"))
    elif (units > 0 > nanos) or (units < 0 < nanos):
        out.append(("nanos", f"must have the sign of units (got units {units}, nanos {nanos})"))
    return out


def _money_check(value: Any, path: str, out: list[Violation], required: bool) -> None:
    for sub, description in _money_problems(value):
        out.append(Violation(f"{path}.{sub}", description))


def _money_problem(value: Any) -> str | None:
    problems = _money_problems(value)
    return "; ".join(f"{sub} {description}" for sub, description in problems) if problems else None
