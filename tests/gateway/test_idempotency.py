"""Which methods the gateway may retry comes from the contract's ``idempotency_level`` alone
(``gateway/descriptors.py``, ``MethodInfo.idempotent``), and the contract says it where it is true."""

from __future__ import annotations

from google.protobuf import descriptor_pb2

from gateway.descriptors import RouteTable

Options = descriptor_pb2.MethodOptions
#: Reads: no side effects.
READS = {
    "cbec.common.v1.ModelAdminService/GetModelStatus",
    "cbec.recommender.v1.RecommenderService/Recommend",
    "cbec.recommender.v1.RecommenderService/SimilarItems",
    "cbec.chat.v1.ChatService/GetSession",
    "cbec.chat.v1.ChatService/GenerateProductCopy",
    "cbec.sentiment.v1.SentimentService/Analyze",
    "cbec.sentiment.v1.SentimentService/AnalyzeStream",
    "cbec.sentiment.v1.SentimentService/GetMarketReport",
    "cbec.vision.v1.VisionService/SearchByImage",
    "cbec.vision.v1.VisionService/GetIndexStats",
    "cbec.gateway.v1.GatewayService/GetHomeFeed",
    "cbec.gateway.v1.GatewayService/GetProductPage",
}
#: Writes that leave the same state however often they are repeated (upserts by id, removals).
REPEATABLE = {
    "cbec.recommender.v1.RecommenderService/UpsertItems",
    "cbec.recommender.v1.RecommenderService/ForgetUser",
    "cbec.chat.v1.ChatService/EndSession",
    "cbec.chat.v1.ChatService/UpsertKnowledge",
    "cbec.sentiment.v1.SentimentService/IngestReviews",
    "cbec.vision.v1.VisionService/IndexProducts",
    "cbec.vision.v1.VisionService/RemoveProducts",
    "cbec.risk.v1.RiskService/ScoreTransaction",
    "cbec.risk.v1.RiskService/ScoreTransactions",
    "cbec.risk.v1.RiskService/ReportOutcome",
    "cbec.gateway.v1.GatewayService/AssessOrder",
}
#: Never retried: appends (events, conversation turns) and loads of "the newest" model version.
NOT_SAFE = {
    "cbec.recommender.v1.RecommenderService/RecordInteractions",
    "cbec.chat.v1.ChatService/Converse",
    "cbec.common.v1.ModelAdminService/LoadModelVersion",
}


def test_every_method_declares_what_is_true_of_it() -> None:
    table = RouteTable.load()
    levels = {key: info.method.GetOptions().idempotency_level for key, info in table.methods.items()}
    assert set(levels) == READS | REPEATABLE | NOT_SAFE, "a new method: say here whether it is safe to retry"
    assert {k for k, v in levels.items() if v == Options.NO_SIDE_EFFECTS} == READS
    assert {k for k, v in levels.items() if v == Options.IDEMPOTENT} == REPEATABLE
    assert {k for k, v in levels.items() if v == Options.IDEMPOTENCY_UNKNOWN} == NOT_SAFE


def test_the_retry_decision_is_the_contracts() -> None:
    table = RouteTable.load()
    assert {key for key, info in table.methods.items() if info.idempotent} == READS | REPEATABLE


def test_get_and_delete_routes_are_declared_safe() -> None:
    """HTTP semantics and the contract agree: a GET has no side effects, a DELETE is repeatable."""
    for route in RouteTable.load().routes:
        level = route.method.method.GetOptions().idempotency_level
        if route.http_method == "GET":
            assert level == Options.NO_SIDE_EFFECTS, route.label
        elif route.http_method == "DELETE":
            assert level in (Options.IDEMPOTENT, Options.NO_SIDE_EFFECTS), route.label
