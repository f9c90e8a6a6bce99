"""Every service, method and HTTP rule, read from the compiled descriptors (no hand-written routes).

All generated ``cbec.*_pb2`` modules are imported, so their file descriptors sit in the default
pool; each method's ``google.api.http`` option (and its ``additional_bindings``) becomes a ``Route``.
A new service or method gets its HTTP route, its OpenAPI entry, its backend and its retry policy
from its proto alone: a method is retried only when its ``idempotency_level`` says it is safe.

Which backend serves a method: the service's package ``cbec.<backend>.v1``; ``cbec.gateway`` is
served in-process; services in ``cbec.common`` are served by every model service and routed by the
request's ``service`` field (``/v1/admin/{service}/model``).
"""

from __future__ import annotations

import importlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cbec.common.v1 import options_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor

from services.runtime.channel import RETRYABLE_LEVELS

LOCAL = "gateway"
#: Services served by every model service, routed by this request field.
SHARED_ROUTING_FIELD = {"cbec.common.v1.ModelAdminService": "service"}


def import_generated_modules() -> list[str]:
    """Import every generated ``cbec`` ``_pb2`` module (they register their files in the pool)."""
    import cbec  # namespace package: the gen/ folder (and any other holding cbec stubs)

    names = []
    for base in list(cbec.__path__):
        for root, _dirs, files in os.walk(base):
            rel = os.path.relpath(root, base)
            package = "cbec" if rel == "." else "cbec." + rel.replace(os.sep, ".")
            names.extend(f"{package}.{f[:-3]}" for f in files if f.endswith("_pb2.py"))
    for name in sorted(names):
        importlib.import_module(name)
    return sorted(names)


# --- path templates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathTemplate:
    """A ``google.api.http`` path template: literals, ``*``, ``**``, ``{field[=segments]}``, ``:verb``."""

    template: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]  # field paths, in order
    literal_count: int  # more literal segments = more specific
    openapi_path: str

    @classmethod
    def parse(cls, template: str) -> PathTemplate:
        if not template.startswith("/"):
            raise ValueError(f"path template {template!r} must start with /")
        body, verb = _split_verb(template)
        pattern = ["^"]
        openapi = []
        variables: list[str] = []
        literals = 0
        for segment in _split_segments(body[1:]):
            pattern.append("/")
            openapi.append("/")
            if segment.startswith("{"):
                inner = segment[1:-1]
                name, _, sub = inner.partition("=")
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                    raise ValueError(f"bad variable {segment!r} in {template!r}")
                group = f"v{len(variables)}"
                variables.append(name)
                pattern.append(f"(?P<{group}>{_segments_regex(sub or '*')})")
                openapi.append("{" + name + "}")
            else:
                pattern.append(_segments_regex(segment))
                openapi.append(segment)
                literals += segment not in ("*", "**")
        if verb:
            pattern.append(":" + re.escape(verb))
            openapi.append(":" + verb)
        pattern.append("$")
        return cls(template, re.compile("".join(pattern)), tuple(variables), literals, "".join(openapi))

    def match(self, raw_path: str) -> dict[str, str] | None:
        m = self.regex.match(raw_path)
        if m is None:
            return None
        return {name: urllib.parse.unquote(m.group(f"v{i}")) for i, name in enumerate(self.variables)}


def _split_verb(template: str) -> tuple[str, str]:
    depth = 0
    last_slash = -1
    colon = -1
    for i, ch in enumerate(template):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0 and ch == "/":
            last_slash, colon = i, -1
        elif depth == 0 and ch == ":" and i > last_slash:
            colon = i
    if colon < 0:
        return template, ""
    return template[:colon], template[colon + 1 :]


def _split_segments(path: str) -> Iterator[str]:
    depth = 0
    current = []
    for ch in path:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "/" and depth == 0:
            yield "".join(current)
            current = []
        else:
            current.append(ch)
    yield "".join(current)


def _segments_regex(segments: str) -> str:
    parts = []
    for seg in segments.split("/"):
        if seg == "*":
            parts.append("[^/]+")
        elif seg == "**":
            parts.append(".+")
        else:
            parts.append(re.escape(seg))
    return "/".join(parts)


# --- methods and routes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodInfo:
    service: ServiceDescriptor
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def key(self) -> str:
        """``pkg.Service/Method`` (the gRPC path without its leading slash)."""
        return f"{self.service.full_name}/{self.method.name}"

    @property
    def path(self) -> str:
        return "/" + self.key

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def kind(self) -> str:
        return {
            (False, False): "unary",
            (False, True): "server_stream",
            (True, False): "client_stream",
            (True, True): "bidi_stream",
        }[(self.client_streaming, self.server_streaming)]

    @cached_property
    def request_cls(self) -> Any:
        return message_factory.GetMessageClass(self.method.input_type)

    @cached_property
    def response_cls(self) -> Any:
        return message_factory.GetMessageClass(self.method.output_type)

    @property
    def package_backend(self) -> str:
        """``cbec.<name>.v1`` -> ``<name>``."""
        parts = self.service.full_name.split(".")
        return parts[1] if len(parts) > 2 else parts[0]

    @property
    def local(self) -> bool:
        return self.package_backend == LOCAL

    @property
    def routing_field(self) -> str | None:
        return SHARED_ROUTING_FIELD.get(self.service.full_name)

    @cached_property
    def access_scope(self) -> str:
        """The scope the proto declares (``option (cbec.common.v1.access)``), "" when it declares none."""
        options = self.method.GetOptions()
        if not options.HasExtension(options_pb2.access):
            return ""
        return str(options.Extensions[options_pb2.access].scope)

    @property
    def scope(self) -> str:
        """The scope a principal needs: the declared one (``admin`` for loads and erasure), else the
        backend name, ``gateway``, or ``admin`` for the shared admin APIs."""
        return self.access_scope or ("admin" if self.routing_field else self.package_backend)

    @cached_property
    def http_rules(self) -> tuple[http_pb2.HttpRule, ...]:
        options = self.method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            return ()
        rule = options.Extensions[annotations_pb2.http]
        return (rule, *rule.additional_bindings)

    @cached_property
    def idempotent(self) -> bool:
        """Safe to retry: the proto declares ``idempotency_level`` NO_SIDE_EFFECTS or IDEMPOTENT (a
        GET or DELETE route without one is a contract error that ``tests/gateway`` catches)."""
        return self.method.GetOptions().idempotency_level in RETRYABLE_LEVELS


@dataclass(frozen=True)
class Route:
    http_method: str  # GET, POST, ...
    template: PathTemplate
    body: str  # "" (no body), "*" (whole request) or a top-level field name
    response_body: str
    method: MethodInfo

    @property
    def label(self) -> str:
        return f"{self.http_method} {self.template.template}"


@dataclass
class RouteTable:
    methods: dict[str, MethodInfo] = field(default_factory=dict)  # by key
    routes: list[Route] = field(default_factory=list)

    @classmethod
    def load(cls) -> RouteTable:
        table = cls()
        for service in _cbec_services(import_generated_modules()):
            for method in service.methods:
                info = MethodInfo(service, method)
                table.methods[info.key] = info
                for rule in info.http_rules:
                    verb = rule.WhichOneof("pattern")
                    if verb is None:
                        continue
                    if verb == "custom":
                        http_method, template = rule.custom.kind.upper(), rule.custom.path
                    else:
                        http_method, template = verb.upper(), getattr(rule, verb)
                    _check_body(info.method.input_type, rule.body)
                    table.routes.append(
                        Route(http_method, PathTemplate.parse(template), rule.body, rule.response_body, info)
                    )
        table.routes.sort(key=lambda r: -r.template.literal_count)
        return table

    def services(self) -> list[ServiceDescriptor]:
        seen: dict[str, ServiceDescriptor] = {}
        for info in self.methods.values():
            seen.setdefault(info.service.full_name, info.service)
        return list(seen.values())

    def backends(self) -> list[str]:
        return sorted(
            {m.package_backend for m in self.methods.values() if not m.local and not m.routing_field}
        )

    def match(self, http_method: str, raw_path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        """The route, its path variables, and (when only the verb is wrong) the allowed verbs."""
        allowed: list[str] = []
        for route in self.routes:
            variables = route.template.match(raw_path)
            if variables is None:
                continue
            if route.http_method == http_method:
                return route, variables, []
            allowed.append(route.http_method)
        return None, {}, sorted(set(allowed))


def _cbec_services(module_names: list[str]) -> Iterator[ServiceDescriptor]:
    seen = set()
    for name in module_names:
        file = importlib.import_module(name).DESCRIPTOR
        if file.name not in seen:
            seen.add(file.name)
            yield from file.services_by_name.values()


def _check_body(message: Descriptor, body: str) -> None:
    if body in ("", "*"):
        return
    if body not in message.fields_by_name:
        raise ValueError(f"http rule body {body!r} is not a field of {message.full_name}")


def field_by_path(message: Descriptor, path: str) -> list[FieldDescriptor]:
    """Resolve ``a.b.c`` (proto or JSON names) to its chain of fields; KeyError when it does not exist."""
    chain = []
    current: Descriptor | None = message
    for part in path.split("."):
        if current is None:
            raise KeyError(path)
        f = current.fields_by_name.get(part) or _by_json_name(current, part)
        if f is None:
            raise KeyError(path)
        chain.append(f)
        current = f.message_type if f.type == FieldDescriptor.TYPE_MESSAGE else None
    return chain


def _by_json_name(message: Descriptor, name: str) -> FieldDescriptor | None:
    for f in message.fields:
        if f.json_name == name:
            return f
    return None
