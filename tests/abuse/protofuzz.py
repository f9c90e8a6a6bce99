"""Hypothesis strategies for any protobuf message, generated from its descriptor, aimed at abuse.

``strategy_for(descriptor)`` draws messages of that type whose fields hold what a careless or hostile
client sends: long, unicode and control-character strings, integers at their type's edges, NaN and
infinities, enum numbers the enum does not define, timestamps and durations far outside any sane
range, garbage and image-looking bytes, empty and huge repeated fields and maps, nested messages.
Where a field declares ``(cbec.common.v1.limits)`` the draws also sit on each side of the limit.

A third of the messages are plausible throughout (ids, codes and amounts like a storefront sends,
recent times), a third are plausible but for one abusive field, and a third are abusive throughout,
so the fuzz reaches past request validation into each servicer as well as hammering the validation.

Own code rather than a library: the PyPI packages for this (hypothesis-protobuf 0.1.0 of 2015,
hypothesis-pb 1.2.0 of 2019, protofuzz 0.2 of 2020, randomproto 0.0.1 of 2019) are unmaintained,
predate the upb protobuf runtime that this project uses, and draw well-formed values: none draws
undefined enum numbers, out-of-range timestamps or oversized repeated fields, which is the point here.

``call_verdict`` is the oracle the fuzz test and ``make bench-abuse`` share: what a failed call must
never look like.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cbec.common.v1 import options_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from services.runtime.errors import field_violations

F = FieldDescriptor
#: A whole error (message, details and every other trailer) stays under this (issue 15).
MAX_ERROR_BYTES = 4096
#: Codes that mean the server failed, not the client: never acceptable for any input.
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})

NASTY_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "\u202egnp.exe",
    "\ufeff",
    "\u200b",
    "\ud7ff\ue000\U0010ffff",
    "😀" * 3,
    "Europe",
    "Europe/",
    "../../../../etc/passwd",
    "/etc/passwd",
    "%00",
    "%2e%2e%2f",
    "' OR 1=1 --",
    "'; DROP TABLE events; --",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "NaN",
    "Infinity",
    "-0",
    "1e309",
    "null",
    "true",
    "0x41",
    "\r\n\r\nX-Injected: 1",
    "*",
    "?",
    "newest",
)
LONG_FILLS = ("a", "é", "😀", "\x00", "\u202e", " ", "9")
LONG_LENGTHS = (63, 64, 65, 255, 256, 257, 1024, 1025, 4001, 10_240, 20_480, 100_000)
MANY_COUNTS = (101, 257, 501, 1001, 10_001, 100_000)
MANY_MESSAGES = (101, 257, 501, 1001)  # repeated messages: each one may cost the server real work


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()
NASTY_BYTES: tuple[bytes, ...] = (
    b"",
    b"\x00",
    PNG,
    PNG[:24],  # a PNG header, then nothing
    PNG[:16] + b"\xff\xff\xff\x7f\xff\xff\xff\x7f" + PNG[24:],  # claims 2^31 x 2^31 pixels
    b"\xff\xd8\xff\xe0" + b"\x00" * 64,  # JPEG start, garbage after
    b"GIF89a\xff\xff\xff\xff",
    b"\x1f\x8b\x08\x00" + b"\x00" * 32,  # gzip header
    b"RIFF\xff\xff\xff\xffWEBPVP8 ",
    "é".encode("latin-1"),  # not UTF-8
    b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8 either
)

INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
SMALL_INTS = (-1, 0, 1, 2, 5, 10, 20, 100, 101, 256, 257, 500, 501, 1000, 1001, 10_000, 2**24)
TIMESTAMP_SECONDS = (
    0,
    -1,
    -(2**62),
    2**62,
    -(2**63),
    2**63 - 1,
    -62_135_596_800,  # 0001-01-01T00:00:00Z, protobuf's minimum
    -62_135_596_801,
    253_402_300_799,  # 9999-12-31T23:59:59Z, protobuf's maximum
    253_402_300_800,
    4_102_444_800,  # 2100-01-01
    1_700_000_000,
)
DURATION_SECONDS = (0, 1, -1, 315_576_000_000, 315_576_000_001, -315_576_000_001, 2**63 - 1, -(2**63))
NANOS = (0, 1, 999_999_999, 1_000_000_000, -1, -999_999_999, 2**31 - 1, -(2**31))


IDS = ("u-1001", "U000001", "P000001", "P000016", "sku-001", "CB-100231", "tx-1", "card-1", "device-1")
SENTENCES = (
    "Where is my order CB-100231?",
    "How long does shipping to Germany take?",
    "Lovely dress, the fabric feels great.",
    "Terrible quality, it broke after one day.",
    "Merino wool sweater",
)
#: Plausible values by what a field's name says it holds (the first rule whose words match wins).
NAMED: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("session_id",), ("",)),  # a new session; a real one is 32 hex digits, drawn below
    (("timezone",), ("Europe/Berlin", "America/New_York", "Asia/Tokyo")),
    (("country", "market"), ("DE", "GB", "US", "FR", "JP")),
    (("currency",), ("EUR", "USD", "GBP", "JPY")),
    (("language",), ("en", "de", "es", "ja")),
    (("category",), ("tops", "bags", "shoes", "skincare", "dresses")),
    (("ip_address",), ("203.0.113.7", "2001:db8::1")),
    (("payment_method",), ("card", "wallet")),
    (("service",), ("recommender", "chat", "sentiment", "vision", "risk")),
    (("version",), ("",)),
    (("_id", "_ids", "id", "fingerprint"), IDS),
    (("message", "text", "body", "title", "description", "name", "note", "term", "topic"), SENTENCES),
)


def plausible_strings(name: str = "") -> st.SearchStrategy[str]:
    """A string a well-behaved client would send in a field called ``name``."""
    if name == "session_id":
        return st.one_of(st.just(""), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))
    for words, values in NAMED:
        if any(name == w or name.endswith(w) or (len(w) > 3 and w in name) for w in words):
            return st.sampled_from(values)
    return st.one_of(
        st.sampled_from(IDS + SENTENCES),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
    )


def strings(max_len: int = 0) -> st.SearchStrategy[str]:
    """Short unicode, known-nasty, control-character and very long strings (and ``max_len`` +- 1)."""
    lengths = LONG_LENGTHS + ((max_len, max_len + 1) if max_len else ())
    control = st.characters(min_codepoint=0, max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028\u2066")
    return st.one_of(
        st.text(max_size=24),
        st.sampled_from(NASTY_STRINGS),
        st.text(alphabet=control, max_size=12),
        st.builds(lambda fill, n: fill * n, st.sampled_from(LONG_FILLS), st.sampled_from(lengths)),
    )


def short_strings() -> st.SearchStrategy[str]:
    """Cheap elements for huge repeated fields."""
    return st.sampled_from(("", "x", "sku-001", "\x00", "é", " "))


def byte_strings(max_len: int = 0) -> st.SearchStrategy[bytes]:
    lengths = (65_536, 65_537, 1_000_000) + ((max_len, max_len + 1) if max_len else ())
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from(NASTY_BYTES),
        st.builds(lambda b, n: b * n, st.sampled_from((b"\x00", b"\xff", b"A")), st.sampled_from(lengths)),
    )


def integers(field_type: int) -> st.SearchStrategy[int]:
    lo, hi = INT_RANGES[field_type]
    edges = [v for v in (*SMALL_INTS, lo, lo + 1, hi - 1, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def floats(width: int = 64) -> st.SearchStrategy[float]:
    edges = (0.0, -0.0, 1.0, -1.0, 1e-300, 5e-324, 1e308, -1e308, 1e15, float("nan"), float("inf"))
    edges += (float("-inf"),)
    if width == 32:
        edges = tuple(e for e in edges if e != e or abs(e) in (0.0, 1.0, float("inf")))
    return st.one_of(st.sampled_from(edges), st.floats(width=width))


def enums(field: FieldDescriptor) -> st.SearchStrategy[int]:
    defined = [v.number for v in field.enum_type.values]
    undefined = st.integers(-(2**31), 2**31 - 1)
    return st.one_of(st.sampled_from(defined), st.sampled_from((max(defined) + 1, -1)), undefined)


def limits_of(field: FieldDescriptor) -> options_pb2.FieldLimits:
    options = field.GetOptions()
    if options.HasExtension(options_pb2.limits):
        return options.Extensions[options_pb2.limits]
    return options_pb2.FieldLimits()


def _timestamp(cls: type[Message]) -> st.SearchStrategy[Message]:
    seconds = st.one_of(st.sampled_from(TIMESTAMP_SECONDS), st.integers(0, 4_102_444_800))
    nanos = st.one_of(st.sampled_from(NANOS), st.integers(0, 999_999_999))
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


def _duration(cls: type[Message]) -> st.SearchStrategy[Message]:
    seconds = st.one_of(st.sampled_from(DURATION_SECONDS), st.integers(-(10**9), 10**9))
    nanos = st.one_of(st.sampled_from(NANOS), st.integers(-999_999_999, 999_999_999))
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


def _recent(cls: type[Message]) -> st.SearchStrategy[Message]:
    now = int(time.time())
    return st.builds(lambda s: cls(seconds=s), st.integers(now - 90 * 86400, now - 60))


def _window(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(lambda d: cls(seconds=d * 86400), st.integers(1, 90))


WELL_KNOWN: dict[str, Callable[[type[Message]], st.SearchStrategy[Message]]] = {
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Duration": _duration,
}
WELL_KNOWN_PLAUSIBLE: dict[str, Callable[[type[Message]], st.SearchStrategy[Message]]] = {
    "google.protobuf.Timestamp": _recent,
    "google.protobuf.Duration": _window,
}


def plausible(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """What a well-behaved client puts in a non-message field."""
    t, name = field.type, field.name
    if t == F.TYPE_STRING:
        return plausible_strings(name)
    if t == F.TYPE_BYTES:
        if "utf8" in name or "text" in name:
            return st.sampled_from(SENTENCES).map(str.encode)
        return st.just(PNG)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(0.5, 500, allow_nan=False, allow_infinity=False, width=32)
    if t == F.TYPE_ENUM:  # defined, and mostly not the zero "unspecified" value
        defined = [v.number for v in field.enum_type.values]
        return st.sampled_from([n for n in defined if n] or defined)
    if t in INT_RANGES:
        return st.integers(1, 5) if name in ("rating", "stars") else st.integers(1, 20)
    raise TypeError(f"no strategy for field type {t} ({field.full_name})")


def scalar(field: FieldDescriptor, cheap: bool = False) -> st.SearchStrategy[Any]:
    """Abusive values of one element of a non-message field (``cheap``: small ones, for huge
    repeated fields)."""
    t = field.type
    limit = limits_of(field)
    if t == F.TYPE_STRING:
        return short_strings() if cheap else strings(limit.max_len)
    if t == F.TYPE_BYTES:
        return st.sampled_from((b"", b"\x00", PNG[:24])) if cheap else byte_strings(limit.max_len)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_DOUBLE:
        return floats(64)
    if t == F.TYPE_FLOAT:
        return floats(32)
    if t == F.TYPE_ENUM:
        return enums(field)
    if t in INT_RANGES:
        return integers(t)
    raise TypeError(f"no strategy for field type {t} ({field.full_name})")


@dataclass(frozen=True)
class _Options:
    max_depth: int
    plausible: bool = False  # every field well-behaved
    cheap: bool = False  # small values only (elements of huge repeated fields)


def strategy_for(descriptor: Descriptor, max_depth: int = 3) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type: plausible, plausible but for one abusive field, or abusive
    throughout, in equal shares (nested up to ``max_depth``)."""
    abusive = _Options(max_depth)
    return _message(descriptor, 0, abusive, _message(descriptor, 0, _Options(max_depth, plausible=True)))


def _message(
    descriptor: Descriptor,
    depth: int,
    options: _Options,
    plausible_twin: st.SearchStrategy[Message] | None = None,
) -> st.SearchStrategy[Message]:
    """Messages with ``options``' kind of values; with ``plausible_twin`` (the top level), a third are
    the twin's and a third the twin's with one field redrawn from these strategies."""
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name in WELL_KNOWN:
        known = WELL_KNOWN_PLAUSIBLE if options.plausible else WELL_KNOWN
        return known[descriptor.full_name](cls)
    fields = [
        f for f in descriptor.fields if f.type != F.TYPE_MESSAGE or depth < options.max_depth or f.is_repeated
    ]
    per_field = {f.name: _field(f, depth, options) for f in fields}

    @st.composite
    def draw_message(draw: st.DrawFn) -> Message:
        mode = draw(st.integers(0, 2)) if plausible_twin is not None else 2
        if mode < 2:
            assert plausible_twin is not None
            message = draw(plausible_twin)
            if mode == 1 and fields:  # one field abused
                f = draw(st.sampled_from(fields))
                message.ClearField(f.name)
                _assign(message, f, draw(per_field[f.name]))
            return message
        message = cls()
        for f in fields:
            if options.plausible or draw(st.booleans()):
                _assign(message, f, draw(per_field[f.name]))
        return message

    return draw_message()


def _field(field: FieldDescriptor, depth: int, options: _Options) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return _map(field, depth, options)
    if field.type == F.TYPE_MESSAGE:
        if depth >= options.max_depth:  # repeated messages this deep: only empty lists
            return st.just([])
        element = _message(field.message_type, depth + 1, options)
        cheap_options = _Options(options.max_depth, options.plausible, cheap=True)
        cheap = (
            _message(field.message_type, options.max_depth, cheap_options) if field.is_repeated else element
        )
    elif options.plausible:
        element = cheap = plausible(field)
    else:
        element, cheap = scalar(field, options.cheap), scalar(field, cheap=True)
    if not field.is_repeated:
        return element
    if options.plausible:
        return st.lists(element, min_size=1, max_size=4)
    return _repeated(element, cheap, field)


def _repeated(
    element: st.SearchStrategy[Any], cheap: st.SearchStrategy[Any], field: FieldDescriptor
) -> st.SearchStrategy[list[Any]]:
    """Mostly a few elements; one draw in five, many copies of one cheap element (past any limit)."""
    counts = MANY_MESSAGES if field.type == F.TYPE_MESSAGE else MANY_COUNTS
    declared = limits_of(field).max_items
    if declared:
        counts = (*counts, declared, declared + 1)

    @st.composite
    def draw_list(draw: st.DrawFn) -> list[Any]:
        if draw(st.integers(0, 4)) < 4:
            return draw(st.lists(element, max_size=3))
        return [draw(cheap)] * draw(st.sampled_from(counts))

    return draw_list()


def _map(field: FieldDescriptor, depth: int, options: _Options) -> st.SearchStrategy[dict[Any, Any]]:
    entry = field.message_type
    key_f, value_f = entry.fields_by_name["key"], entry.fields_by_name["value"]
    if options.plausible:
        keys = plausible(key_f)
    else:
        keys = (
            scalar(key_f, options.cheap) if key_f.type != F.TYPE_STRING else strings(limits_of(field).max_len)
        )
    if value_f.type == F.TYPE_MESSAGE:
        values = _message(value_f.message_type, min(depth + 1, options.max_depth), options)
    else:
        values = plausible(value_f) if options.plausible else scalar(value_f, options.cheap)
    if options.plausible:
        return st.dictionaries(keys, values, max_size=4)
    declared = limits_of(field).max_items

    @st.composite
    def draw_map(draw: st.DrawFn) -> dict[Any, Any]:
        if draw(st.integers(0, 4)) < 4:
            return draw(st.dictionaries(keys, values, max_size=3))
        n = draw(st.sampled_from((*MANY_MESSAGES, *((declared + 1,) if declared else ()))))
        value = draw(values)
        if key_f.type == F.TYPE_STRING:
            return {f"k{i}": value for i in range(n)}
        return {i: value for i in range(n)} if key_f.type != F.TYPE_BOOL else {True: value}

    return draw_map()


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if field.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


# --- the oracle ----------------------------------------------------------------------------------
def error_size(error: grpc.RpcError) -> int:
    """Bytes of what a failed call sent back: its message and every trailer (rich details included)."""
    size = len((error.details() or "").encode("utf-8", "replace"))  # type: ignore[attr-defined]
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        size += len(key) + len(value if isinstance(value, bytes) else str(value).encode())
    return size


def call_verdict(error: grpc.RpcError | None) -> list[str]:
    """What is wrong with how a call failed (empty: nothing). A call that succeeded is always fine.

    Never INTERNAL/UNKNOWN/DATA_LOSS; an INVALID_ARGUMENT names the field in a BadRequest; the whole
    error stays under 4 KB; a RESOURCE_EXHAUSTED about metadata means an error outgrew gRPC's limit.
    """
    if error is None:
        return []
    code = error.code()  # type: ignore[attr-defined]
    details = (error.details() or "")[:300]  # type: ignore[attr-defined]
    problems: list[str] = []
    if code in SERVER_FAULTS:
        problems.append(f"{code.name}: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT and not field_violations(error):
        problems.append(f"INVALID_ARGUMENT without a BadRequest field violation: {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in details.lower():
        problems.append(f"the error outgrew gRPC's trailer limit: {details}")
    size = error_size(error)
    if size >= MAX_ERROR_BYTES:
        problems.append(f"{code.name} error of {size} bytes (limit {MAX_ERROR_BYTES}): {details}")
    return problems


def request_methods(services: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(service descriptor, method descriptor) of every method of ``services``."""
    return [(service, method) for service in services for method in service.methods]
