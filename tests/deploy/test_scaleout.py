"""Issue 14's cluster on one machine: the chart's rendered pods run as processes (2 replicas of every
stateful service, 2 gateways) on real PostgreSQL and Redis, and the replicas must agree.

See tests/deploy/chart_run.py for what is executed as rendered and what a single host substitutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.deploy.chart_run import ROOT, writable_by_pod_user
from tests.deploy.scaleout import STATEFUL, Suite, png, running_suite

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    with running_suite() as running:
        yield running


@pytest.fixture
async def s(suite: Suite) -> AsyncIterator[Suite]:
    yield suite
    await suite.close()


def test_pods_run_as_the_chart_says(suite: Suite) -> None:
    """Every pod: non-root, the code directory not writable, state only on the pod's volumes."""
    assert not writable_by_pod_user(ROOT), "the pod user can write the code directory"
    assert len(suite.pods("gateway")) == 2
    for name in STATEFUL:
        pods = suite.pods(name)
        assert len(pods) == 2, name
        for pod in pods:
            assert pod.alive, pod.log_tail()
            assert pod.env["CBEC_STATE_BACKEND"] == "shared"
            state_dir = Path(pod.env["CBEC_STATE_DIR"])
            assert pod.pod_dir in state_dir.parents, state_dir
            assert "CBEC_DATABASE_PASSWORD" in pod.env and pod.env["CBEC_DATABASE_URL"].startswith(
                "postgresql://"
            )
    chat = suite.pods("chat")[0]
    sentiment_ips = {p.ip for p in suite.pods("sentiment")}
    assert {
        a.split(":")[0] for a in chat.env["CBEC_SENTIMENT_ADDR"].removeprefix("ipv4:").split(",")
    } == sentiment_ips
    assert not list(ROOT.glob("var/**/*.sqlite3*")) or all(
        p.stat().st_uid != 10001 for p in ROOT.glob("var/**/*")
    ), "a pod wrote under the code directory"


async def test_an_interaction_changes_every_replicas_recommendations(s: Suite) -> None:
    items = await s.catalogue_items()
    async with s.http() as session:
        for gateway in (0, 1):
            delay = await s.recommender_effect(session, gateway, items)
            assert delay < 10


async def test_a_product_indexed_on_one_replica_is_searchable_on_every_replica(s: Suite) -> None:
    for writer in (0, 1):
        indexed, removed = await s.vision_effect(png(100 + writer), writer)
        assert indexed < 10 and removed < 10


async def test_a_review_counts_in_every_replicas_report(s: Suite) -> None:
    async with s.http() as session:
        for gateway in (0, 1):
            assert await s.sentiment_effect(session, gateway) < 10


async def test_a_chat_session_continues_on_any_replica(s: Suite) -> None:
    assert await s.chat_continuity(turns=4) == 0


async def test_risk_sees_every_earlier_transaction_whichever_replica_scored_it(s: Suite) -> None:
    """Scores alternating over the two replicas equal scores of the same sequence on one replica, and
    differ from the same purchases without history: both replicas saw the card's whole history."""
    mismatches, history_effect = await s.velocity_mismatches(cards=3, per_card=6)
    assert history_effect > 0, "history does not change any score: the check would prove nothing"
    assert mismatches == 0


async def test_the_rate_limit_holds_across_gateways(s: Suite) -> None:
    allowed, ratio = await s.rate_limit_excess(seconds=3.0)
    assert allowed > 0
    assert ratio <= 1.1, f"{allowed} calls allowed across 2 gateways, {ratio:.2f}x the limit"


async def test_nothing_acknowledged_is_lost_when_a_replica_is_killed(s: Suite) -> None:
    report = await s.kill9_under_load(seconds=10.0, kill_at=3.0)
    for kind, counts in report.items():
        assert counts["acknowledged"] > 0, (kind, counts)
        assert counts["lost"] == 0, (kind, counts)
    await asyncio.sleep(0)
