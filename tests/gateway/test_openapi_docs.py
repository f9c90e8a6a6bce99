"""The OpenAPI document carries the contract's words: proto comments as descriptions (read here from
the .proto sources themselves, not from the descriptor set the generator reads), field behaviour,
deprecations, enum values, the error reasons and the link to the error catalogue."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2

from gateway.descriptors import RouteTable
from gateway.openapi import REF, build_openapi, field_behaviors, find_descriptor_set, load_comments
from services.runtime.error_catalogue import CATALOGUE, DOC_PATH

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos" / "cbec").rglob("*.proto"))
_COMMENT = r"((?:[ \t]*//[^\n]*\n)+)"


@pytest.fixture(scope="module")
def routes() -> RouteTable:
    return RouteTable.load()


@pytest.fixture(scope="module")
def doc(routes: RouteTable) -> dict[str, Any]:
    return build_openapi(routes, routes.backends())


def flat(text: str) -> str:
    return " ".join(text.split())


def comment_text(block: str) -> str:
    return flat(" ".join(line.strip()[2:] for line in block.splitlines()))


def commented(kind: str) -> dict[str, str]:
    """``{package.Name: comment}`` for each ``kind`` (``rpc``, ``message``, ``enum``) with a comment
    right above it in the .proto sources."""
    out = {}
    for path in PROTOS:
        text = path.read_text(encoding="utf-8")
        package = re.search(r"^package ([\w.]+);", text, re.M).group(1)  # type: ignore[union-attr]
        for m in re.finditer(_COMMENT + rf"[ \t]*{kind} (\w+)", text):
            out[f"{package}.{m.group(2)}"] = comment_text(m.group(1))
    return out


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Operations by gRPC method name (``pkg.Service.Method``)."""
    out = {}
    for item in doc["paths"].values():
        for op in item.values():
            out[op["x-grpc-method"].lstrip("/").replace("/", ".")] = op
    return out


def test_the_descriptor_set_with_source_info_is_found() -> None:
    path = find_descriptor_set()
    assert path is not None and path.name == "cbec.binpb"
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    assert any(f.source_code_info.location for f in files if f.name.startswith("cbec/"))


def test_every_commented_rpc_has_its_comment_as_summary_and_description(doc: dict[str, Any]) -> None:
    rpcs = commented("rpc")  # package.Method (method names are unique within a package here)
    checked = 0
    for name, op in operations(doc).items():
        package, _service, method = name.rsplit(".", 2)
        comment = rpcs.get(f"{package}.{method}")
        if comment is None:
            assert op["summary"].startswith(name.rsplit(".", 1)[0]), name  # the fallback summary
            continue
        checked += 1
        assert flat(op["description"]).startswith(comment), name
        assert comment.startswith(op["summary"]), (name, op["summary"])
        assert op["x-grpc-method"] in op["description"]  # the generated part follows the comment
    assert checked >= 15


def test_every_commented_message_and_enum_carries_its_comment(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    messages = {n: c for n, c in commented("message").items() if n in schemas}
    assert len(messages) >= 10
    for name, comment in messages.items():
        assert comment in flat(schemas[name].get("description", "")), name
    # enums are inline: their comment is in each property that holds one
    strategy = schemas["cbec.recommender.v1.RecommendResponse"]["properties"]["strategy"]
    assert commented("enum")["cbec.recommender.v1.Strategy"] in flat(strategy["description"])


def test_field_comments_and_enum_values_become_property_descriptions(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    source = (ROOT / "protos/cbec/recommender/v1/recommender.proto").read_text(encoding="utf-8")
    # every commented field of RecommendFilters (one message, read from the source)
    body = re.search(r"message RecommendFilters \{(.*?)\n\}", source, re.S).group(1)  # type: ignore[union-attr]
    fields = re.findall(_COMMENT + r"\s*(?:repeated )?\w+ (\w+) = \d+", body)
    assert len(fields) == 3
    props = schemas["cbec.recommender.v1.RecommendFilters"]["properties"]
    for block, name in fields:
        json_name = re.sub(r"_(\w)", lambda m: m.group(1).upper(), name)
        assert flat(props[json_name]["description"]) == comment_text(block), name
    # each enum value is listed, with its comment where it has one
    strategy = schemas["cbec.recommender.v1.RecommendResponse"]["properties"]["strategy"]["description"]
    assert "- `STRATEGY_COLD_START`: Market-aware popularity for a user with no history." in strategy
    assert "- `STRATEGY_UNSPECIFIED`" in strategy
    # a message-typed property keeps its comment next to the $ref (OpenAPI 3.0 ignores $ref siblings)
    serving = schemas["cbec.common.v1.GetModelStatusResponse"]["properties"]["serving"]
    assert serving["allOf"] == [{"$ref": REF + "cbec.common.v1.ModelInfo"}]
    assert serving["description"] == "The serving model; unset while none is loaded."


def test_field_behaviour_and_deprecation_mark_the_schemas(routes: RouteTable, doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    seen = {"required": 0, "readOnly": 0, "deprecated": 0}
    for name, schema in schemas.items():
        if not name.startswith("cbec."):
            continue
        descriptor = _message(routes, name)
        for f in descriptor.fields:
            prop = schema["properties"][f.json_name]
            behaviors = field_behaviors(f)
            required = field_behavior_pb2.REQUIRED in behaviors
            assert (f.json_name in schema.get("required", [])) == required, (name, f.name)
            assert prop.get("readOnly", False) == (field_behavior_pb2.OUTPUT_ONLY in behaviors), (
                name,
                f.name,
            )
            assert prop.get("deprecated", False) == f.GetOptions().deprecated, (name, f.name)
            seen["required"] += required
            seen["readOnly"] += bool(prop.get("readOnly"))
            seen["deprecated"] += bool(prop.get("deprecated"))
    # the contract uses each of them, so the extension is really read
    assert all(seen.values()), seen


def _message(routes: RouteTable, full_name: str) -> Any:
    from google.protobuf import descriptor_pool

    return descriptor_pool.Default().FindMessageTypeByName(full_name)


def test_services_are_described_as_tags(doc: dict[str, Any]) -> None:
    tags = {t["name"]: t.get("description", "") for t in doc["tags"]}
    services = commented("service")
    assert set(tags) == {op["tags"][0] for op in operations(doc).values()}
    for name, description in tags.items():
        if name in services:
            assert flat(description) == services[name]


def test_without_source_info_the_document_has_no_descriptions_but_is_whole(
    routes: RouteTable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    found = find_descriptor_set()
    assert found is not None
    stripped = descriptor_pb2.FileDescriptorSet.FromString(found.read_bytes())
    for f in stripped.file:
        f.ClearField("source_code_info")
    path = tmp_path / "cbec.binpb"
    path.write_bytes(stripped.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="cbec.gateway"):
        assert load_comments(path) == {}
    assert "no source info" in caplog.text
    bare = build_openapi(routes, routes.backends(), comments={})
    full = build_openapi(routes, routes.backends())
    assert set(bare["paths"]) == set(full["paths"])
    op = bare["paths"]["/v1/recommender/recommend"]["post"]
    assert op["summary"] == "cbec.recommender.v1.RecommenderService.Recommend (unary)"


def test_the_error_catalogue_is_linked_and_its_reasons_listed(doc: dict[str, Any]) -> None:
    assert DOC_PATH in doc["info"]["description"] and (ROOT / DOC_PATH).is_file()
    responses = doc["components"]["responses"]
    listed = " ".join(r["description"] for r in responses.values())
    for entry in CATALOGUE:
        assert entry.reason in listed, entry.reason
    assert "SCOPE_MISSING" in responses["E403"]["description"]
    assert "RATE_LIMITED" in responses["E429"]["description"]
