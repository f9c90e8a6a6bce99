"""The error catalogue (``services/runtime/error_catalogue.py``, rendered in docs/errors.md) and the code
agree both ways: every ``ErrorInfo.reason`` the services and the gateway can return is declared, with
its domain, gRPC code, HTTP status and metadata keys, and every declared reason is returned somewhere.

The reasons are read out of the code, not declared twice: an AST scan of services/ and gateway/ finds
each ``google.rpc.ErrorInfo(reason=..., domain=...)``. Where its reason is ``self.reason`` (an error
class such as ``GatewayError``), every construction of that class with ``reason="..."`` is a reason;
where it is a parameter of a function (``unauthenticated(message, reason)``), every call of that
function gives one (or the parameter's default). A reason the scan cannot read as a string literal
fails the test: the catalogue could not be checked against it. The scan is ours because it is a
narrow walk over Python's own ``ast``; no linter checks a project's error vocabulary.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.errors import DOMAIN, HTTP_STATUS
from services.runtime import error_catalogue
from services.runtime.error_catalogue import BY_REASON, CATALOGUE, DOC_PATH

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("services", "gateway")


@dataclass(frozen=True)
class Sink:
    """How a reason reaches an ErrorInfo: what the scan knows of the error it ends up in."""

    domain: str | None
    code: str | None = None
    http_status: int | None = None
    metadata: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Found:
    reason: str
    domain: str | None
    code: str | None
    http_status: int | None
    metadata: tuple[str, ...] | None
    where: str


@dataclass
class Scan:
    found: list[Found] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Helper:
    """A function that passes its parameter ``name`` (at ``index``) on as a reason."""

    index: int
    name: str
    default: ast.expr | None
    sink: Sink


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _code(call: ast.Call) -> str | None:
    node = _keyword(call, "code") or (call.args[0] if call.args else None)
    if isinstance(node, ast.Attribute) and _name(node.value) == "StatusCode":
        return node.attr
    return None


def _metadata(call: ast.Call) -> tuple[str, ...] | None:
    node = _keyword(call, "metadata")
    if node is None:
        return ()
    if isinstance(node, ast.Dict) and all(_literal(k) is not None for k in node.keys if k is not None):
        return tuple(sorted(_literal(k) for k in node.keys if k is not None))  # type: ignore[misc]
    return None  # not a literal: not checked


def _http(call: ast.Call) -> int | None:
    node = _keyword(call, "http_status")
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, int) else None


def _constants(tree: ast.Module) -> dict[str, str]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _literal(node.value)
            if value is not None:
                out[node.targets[0].id] = value
    return out


def _scopes(tree: ast.AST) -> list[tuple[ast.Call, list[ast.AST]]]:
    """Every call, with the function and class definitions around it (innermost last)."""
    out: list[tuple[ast.Call, list[ast.AST]]] = []

    def walk(node: ast.AST, stack: list[ast.AST]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            stack = [*stack, node]
        if isinstance(node, ast.Call):
            out.append((node, stack))
        for child in ast.iter_child_nodes(node):
            walk(child, stack)

    walk(tree, [])
    return out


def _parameter(function: ast.AST | None, name: str) -> tuple[int, ast.expr | None] | None:
    """(position, default) of the parameter ``name`` of ``function``, if it has one."""
    if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    args = [*function.args.posonlyargs, *function.args.args]
    defaults: list[ast.expr | None] = [None] * (len(args) - len(function.args.defaults))
    defaults += function.args.defaults
    for i, a in enumerate(args):
        if a.arg == name:
            offset = 1 if args and args[0].arg in ("self", "cls") else 0
            return i - offset, defaults[i]
    for a, default in zip(function.args.kwonlyargs, function.args.kw_defaults, strict=True):
        if a.arg == name:
            return -1, default
    return None


def scan(sources: dict[str, str]) -> Scan:
    """The reasons in ``sources`` (``{location: python source}``)."""
    result = Scan()
    trees = {where: ast.parse(text) for where, text in sources.items()}
    constants = {where: _constants(tree) for where, tree in trees.items()}
    calls = {where: _scopes(tree) for where, tree in trees.items()}
    classes: dict[str, Sink] = {}  # error classes whose ErrorInfo reason is self.reason
    helpers: dict[str, _Helper] = {}

    def sink_reason(
        call: ast.Call, sink: Sink, stack: list[ast.AST], where: str, node: ast.expr | None
    ) -> None:
        """One reason expression that reaches ``sink``."""
        place = f"{where}:{call.lineno}"
        if node is None:
            return
        literal = _literal(node)
        if literal is not None:
            result.found.append(
                Found(literal, sink.domain, sink.code, sink.http_status, sink.metadata, place)
            )
            return
        function = next((s for s in reversed(stack) if not isinstance(s, ast.ClassDef)), None)
        if isinstance(node, ast.Name) and function is not None:
            param = _parameter(function, node.id)
            if param is not None:
                name = function.name  # type: ignore[attr-defined]
                helpers.setdefault(name, _Helper(param[0], node.id, param[1], sink))
                return
        result.unresolved.append(f"{place}: reason={ast.unparse(node)}")

    # 1. ErrorInfo(...) itself: a literal, a parameter, or self.reason of an error class
    for where, found_calls in calls.items():
        for call, stack in found_calls:
            if _name(call.func) != "ErrorInfo":
                continue
            domain_node = _keyword(call, "domain")
            domain = _literal(domain_node) or (
                constants[where].get(domain_node.id) if isinstance(domain_node, ast.Name) else None
            )
            reason = _keyword(call, "reason")
            owner = next((s for s in reversed(stack) if isinstance(s, ast.ClassDef)), None)
            if isinstance(reason, ast.Attribute) and _name(reason.value) == "self" and owner is not None:
                classes[owner.name] = Sink(domain)
                continue
            sink_reason(call, Sink(domain, None, None, _metadata(call)), stack, where, reason)
    # 2. constructions of those classes, and calls of the functions that pass a reason on; a function
    # found to pass one on is scanned for in the next round
    done: set[str] = set()
    while todo := (set(classes) | set(helpers)) - done:
        for where, found_calls in calls.items():
            for call, stack in found_calls:
                callee = _name(call.func)
                if callee not in todo:
                    continue
                if callee in classes:
                    base = classes[callee]
                    sink = Sink(base.domain, _code(call), _http(call), _metadata(call))
                    sink_reason(call, sink, stack, where, _keyword(call, "reason"))
                    continue
                h = helpers[callee]
                node = _keyword(call, h.name)
                if node is None and 0 <= h.index < len(call.args):
                    node = call.args[h.index]
                sink_reason(call, h.sink, stack, where, node if node is not None else h.default)
        done |= todo
    return result


def scan_code() -> Scan:
    sources = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            sources[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return scan(sources)


# --- the scanner itself -----------------------------------------------------------------------------
SAMPLE = """
import grpc
from google.rpc import error_details_pb2
DOMAIN = "sample.cbec.ai"

class SampleError(Exception):
    def to_status(self):
        return error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)

def not_found(message, reason="GONE"):
    return SampleError(grpc.StatusCode.NOT_FOUND, message, reason=reason)

def wrapped(message, why):
    return not_found(message, why)

def use():
    not_found("a")
    not_found("b", reason="MOVED")
    wrapped("c", "HIDDEN")
    SampleError(grpc.StatusCode.INTERNAL, "d", reason="BROKEN", metadata={"part": "x"}, http_status=502)
    SampleError(grpc.StatusCode.INTERNAL, "e", reason=pick())
    error_details_pb2.ErrorInfo(reason="DIRECT", domain="other.cbec.ai")
"""


def test_the_scan_follows_classes_helpers_and_defaults_and_flags_what_it_cannot_read() -> None:
    result = scan({"sample.py": SAMPLE})
    by_reason = {f.reason: f for f in result.found}
    assert set(by_reason) == {"GONE", "MOVED", "HIDDEN", "BROKEN", "DIRECT"}
    assert by_reason["GONE"].code == "NOT_FOUND" and by_reason["GONE"].domain == "sample.cbec.ai"
    assert by_reason["HIDDEN"].code == "NOT_FOUND"  # through two functions
    assert by_reason["BROKEN"].http_status == 502 and by_reason["BROKEN"].metadata == ("part",)
    assert by_reason["DIRECT"].domain == "other.cbec.ai"
    assert result.unresolved == ["sample.py:21: reason=pick()"]


# --- the catalogue against the code -----------------------------------------------------------------
def test_every_reason_in_the_code_is_in_the_catalogue_and_every_declared_one_is_returned() -> None:
    result = scan_code()
    assert not result.unresolved, "reasons that are not string literals:\n" + "\n".join(result.unresolved)
    in_code = {f.reason for f in result.found}
    assert len(in_code) >= 20
    undeclared = sorted(in_code - set(BY_REASON))
    unused = sorted(set(BY_REASON) - in_code)
    assert not undeclared, f"reasons returned but not in {error_catalogue.__name__}: {undeclared}"
    assert not unused, f"reasons declared but never returned: {unused}"
    assert len(BY_REASON) == len(CATALOGUE)  # no reason declared twice


def test_each_reason_has_the_declared_domain_code_status_and_metadata() -> None:
    wrong = []
    for f in scan_code().found:
        entry = BY_REASON[f.reason]
        if f.domain != entry.domain:
            wrong.append(f"{f.where} {f.reason}: domain {f.domain!r}, declared {entry.domain!r}")
        if f.code is not None and f.code != entry.code.name:
            wrong.append(f"{f.where} {f.reason}: code {f.code}, declared {entry.code.name}")
        code = grpc.StatusCode[f.code] if f.code else entry.code
        http = f.http_status or HTTP_STATUS[code]
        if http != entry.http_status:
            wrong.append(f"{f.where} {f.reason}: HTTP {http}, declared {entry.http_status}")
        if f.metadata is not None and set(f.metadata) != set(entry.metadata):
            wrong.append(f"{f.where} {f.reason}: metadata {f.metadata}, declared {entry.metadata}")
    assert not wrong, "\n".join(wrong)
    assert error_catalogue.GATEWAY_DOMAIN == DOMAIN


# --- the catalogue against its document -------------------------------------------------------------
def test_docs_errors_md_shows_the_current_catalogue() -> None:
    text = (ROOT / DOC_PATH).read_text(encoding="utf-8")
    assert error_catalogue.render(text) == text, (
        f"{DOC_PATH} is out of date: run python -m services.runtime.error_catalogue --write"
    )
    table = text.split(error_catalogue.BEGIN_MARK)[1].split(error_catalogue.END_MARK)[0]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]+)` \| (\w+) \| (\d+) \|", table, re.M)
    documented = {reason: (domain, code, int(http)) for reason, domain, code, http in rows}
    declared = {e.reason: (e.domain, e.code.name, e.http_status) for e in CATALOGUE}
    assert documented == declared


def test_the_readme_links_the_catalogue() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"]({DOC_PATH})" in readme
