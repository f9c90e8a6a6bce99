"""The faithfulness check inside Converse, end to end over real gRPC: an LLM rewrite reaches the customer
one sentence at a time, each only after it passed the check; a sentence that fails stops generation and
is never streamed; with nothing passed the extractive answer is sent and ``fallback_reason`` says why.

The LLM here is a scripted writer (``ScriptedLLM``, an ``LLMBackend`` injected where the service loads
its backend) because it is the only way to make the LLM write a chosen faithful or unfaithful answer:
the real SmolLM2 cannot be steered to a given wrong number, country, contradiction or half sentence. The
real model through the same path is covered in test_llm.py. Everything else is real: the server, the
retrieval, the plan's evidence, the e5 embeddings and the check.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cbec.chat.v1 import chat_pb2

import services.chat.server as chat_server
from services.chat.llm import GenerationError, GenerationStats, Messages
from tests.chat.conftest import Prepared, chat_settings, converse, running

CANADA = "How long does shipping to Canada take?"
ROW = "6-10"  # the North America row: standard 6-10 business days, express 3-5
GOOD_1 = "Standard delivery to Canada takes 6-10 business days."
GOOD_2 = "Express takes 3-5 business days."
# Held until the server cancels: a stream the server does not stop would write this part after it.
HOLD_S = 30.0
LLM_SOURCE = chat_pb2.ANSWER_SOURCE_LLM
ARTICLE_SOURCE = chat_pb2.ANSWER_SOURCE_ARTICLE


@dataclass
class Generation:
    """One call of ``generate``, as the backend saw it."""

    messages: list[dict[str, str]]
    deltas: int = 0
    written: str = ""
    cancelled: bool = False
    finished: bool = False  # wrote all of its text
    done: threading.Event = field(default_factory=threading.Event)  # generate returned

    @property
    def facts(self) -> str:
        return self.messages[0]["content"].split("Facts:\n", 1)[1]


@dataclass
class ScriptedLLM:
    """An ``LLMBackend`` that writes the text its script gives for the question, a few characters per
        delta, checking ``cancel`` before each. The script returns pieces: after each piece but the last the
        writer waits (up to ``HOLD_S``) for ``cancel``, so a test can tell a stream the server stopped from
        one it let run. ``gate``: when given, every generation waits for it before writing (busy slots);
    ``error``: raised after the text is written (a backend failing mid-answer)."""

    script: Callable[[str], Sequence[str]]
    step: int = 3
    gate: threading.Event | None = None
    error: Exception | None = None
    name: str = "scripted"
    languages: frozenset[str] = frozenset({"en"})
    generations: list[Generation] = field(default_factory=list)
    _active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> int:
        return self._active

    def generate(
        self,
        messages: Messages,
        max_tokens: int,
        on_delta: Callable[[str], None],
        cancel: threading.Event,
        ignore_eos: bool = False,
    ) -> GenerationStats:
        g = Generation([dict(m) for m in messages])
        self.generations.append(g)
        with self._lock:
            self._active += 1
        try:
            if self.gate is not None:
                self.gate.wait(HOLD_S)
            pieces = list(self.script(messages[-1]["content"]))
            for n, piece in enumerate(pieces):
                if n and cancel.wait(HOLD_S):
                    break
                for i in range(0, len(piece), self.step):
                    if cancel.is_set():
                        break
                    on_delta(piece[i : i + self.step])
                    g.deltas += 1
                    g.written += piece[i : i + self.step]
            g.cancelled = cancel.is_set()
            g.finished = g.written == "".join(pieces)
            if self.error is not None and not g.cancelled:
                raise self.error
            return GenerationStats(
                tokens=g.deltas,
                cancelled=g.cancelled,
                finish_reason="cancelled" if g.cancelled else "stop",
            )
        finally:
            with self._lock:
                self._active -= 1
            g.done.set()

    def close(self) -> None:
        pass


def fixed(*pieces: str) -> Callable[[str], Sequence[str]]:
    return lambda _question: pieces


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ScriptedLLM]]:
    """Makes the service load a ``ScriptedLLM`` (built with these arguments) as its LLM."""

    def install(script: Callable[[str], Sequence[str]], **kwargs: Any) -> ScriptedLLM:
        backend = ScriptedLLM(script, **kwargs)
        monkeypatch.setattr(chat_server, "llm_from_settings", lambda settings, device: backend)
        return backend

    yield install


async def last_generation(backend: ScriptedLLM) -> Generation:
    """The latest generation once ``generate`` has returned (the server may answer before it does: a
    cancelled generation ends in the LLM pool after the result is sent)."""
    g = backend.generations[-1]
    assert await asyncio.to_thread(g.done.wait, HOLD_S * 2)
    return g


def rewrites(server: Any, outcome: str) -> float:
    value = server.metrics.registry.get_sample_value("chat_llm_rewrites_total", {"outcome": outcome})
    return value or 0.0


async def _until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 -- polls another thread's state
        await asyncio.sleep(0.02)


def _settings(prepared: Prepared, state_dir: Path, **overrides: Any) -> Any:
    return chat_settings(prepared, state_dir, llm_backend="gguf", **overrides)


def held(wrong: str, rest: str = GOOD_2) -> tuple[str, str]:
    """``wrong`` and the first letter of ``rest`` (which completes ``wrong`` for the splitter), then the
    rest of ``rest`` only if the server lets the stream go on."""
    return f"{wrong} {rest[0]}", rest[1:]


async def test_faithful_rewrite_streams_sentence_by_sentence(
    prepared: Prepared, state_dir: Path, scripted: Callable[..., ScriptedLLM]
) -> None:
    backend = scripted(fixed(f"{GOOD_1} {GOOD_2}"))
    async with running(_settings(prepared, state_dir)) as (server, stub):
        deltas, result = await converse(stub, CANADA, market="CA")
    g = await last_generation(backend)
    assert (
        "North America (United States, Canada, Mexico): standard 6-10 business days, express 3-5" in g.facts
    )
    assert "(Customer's country: Canada)" in g.messages[-1]["content"]
    assert result.answer_source == LLM_SOURCE and not result.fallback_reason
    # Held back until whole: one delta per checked sentence, although the writer sent many small ones.
    assert deltas == [GOOD_1, f" {GOOD_2}"] and g.deltas > len(deltas)
    assert "".join(deltas) == result.answer
    assert g.finished and not g.cancelled
    assert rewrites(server, "accepted") == 1 and rewrites(server, "rejected") == 0


async def test_wrong_number_is_never_streamed_and_stops_generation(
    prepared: Prepared, state_dir: Path, scripted: Callable[..., ScriptedLLM]
) -> None:
    wrong = "Delivery to Canada takes 2-3 business days."
    backend = scripted(fixed(*held(wrong)))
    async with running(_settings(prepared, state_dir)) as (server, stub):
        deltas, result = await converse(stub, CANADA)
        assert rewrites(server, "rejected") == 1 and rewrites(server, "accepted") == 0
        assert server.metrics.registry.get_sample_value("chat_llm_cancelled_total") == 1
    assert result.answer_source == ARTICLE_SOURCE
    assert result.fallback_reason.startswith("rewrite failed the faithfulness check (number:")
    assert ROW in result.answer and "".join(deltas) == result.answer
    assert not any("2-3" in d for d in deltas) and "2-3" not in result.answer
    g = await last_generation(backend)
    assert g.cancelled and not g.finished  # stopped before writing the rest


@pytest.mark.parametrize(
    ("question", "wrong", "rule", "tell"),
    [
        # A country the evidence does not name.
        (CANADA, "Standard delivery to Germany takes 6-10 business days.", "country", "Germany"),
        # Canada's row said of another country the evidence names ("binding"; "number" if the evidence
        # is only the North America row).
        (CANADA, "Standard delivery to Canada takes 7-12 business days.", "binding|number", "takes 7-12"),
        # The evidence says the labels are free for the United States.
        (
            "Is return shipping free?",
            "Return labels are not free for the United States.",
            "contradiction",
            "not free",
        ),
        # An invented carrier.
        (CANADA, "Canada Post delivers standard orders in 6-10 business days.", "name", "Post"),
    ],
    ids=["country", "binding", "contradiction", "name"],
)
async def test_unfaithful_rewrite_is_caught(
    prepared: Prepared,
    state_dir: Path,
    scripted: Callable[..., ScriptedLLM],
    question: str,
    wrong: str,
    rule: str,
    tell: str,
) -> None:
    backend = scripted(fixed(*held(wrong)))
    async with running(_settings(prepared, state_dir)) as (server, stub):
        deltas, result = await converse(stub, question)
        assert rewrites(server, "rejected") == 1
    assert result.answer_source == ARTICLE_SOURCE and "".join(deltas) == result.answer
    prefix = "rewrite failed the faithfulness check ("
    assert result.fallback_reason.startswith(prefix), result.fallback_reason
    assert result.fallback_reason[len(prefix) :].split(":")[0] in rule.split("|"), result.fallback_reason
    g = await last_generation(backend)
    assert tell in g.written  # written by the LLM, never streamed
    assert not any(tell in d for d in deltas) and tell not in result.answer
    assert g.cancelled and not g.finished


async def test_half_sentence_at_the_end_is_never_streamed(
    prepared: Prepared, state_dir: Path, scripted: Callable[..., ScriptedLLM]
) -> None:
    backend = scripted(fixed(f"{GOOD_1} Express takes"))
    async with running(_settings(prepared, state_dir)) as (server, stub):
        deltas, result = await converse(stub, CANADA)
        assert rewrites(server, "incomplete") == 1 and rewrites(server, "accepted") == 0
    assert deltas == [GOOD_1] and result.answer == GOOD_1
    assert result.answer_source == LLM_SOURCE
    assert result.fallback_reason == "the rewrite ended mid-sentence"
    assert (await last_generation(backend)).finished


async def test_a_wrong_second_sentence_leaves_only_the_first(
    prepared: Prepared, state_dir: Path, scripted: Callable[..., ScriptedLLM]
) -> None:
    wrong = "Express delivery to Canada takes 2-3 business days."
    first, rest = held(wrong, "Standard delivery is free on orders over 60.")
    backend = scripted(fixed(f"{GOOD_1} {first}", rest))
    async with running(_settings(prepared, state_dir)) as (server, stub):
        deltas, result = await converse(stub, CANADA)
        assert rewrites(server, "rejected") == 1
    assert deltas == [GOOD_1] and result.answer == GOOD_1
    assert result.answer_source == LLM_SOURCE
    assert result.fallback_reason.startswith("rewrite failed the faithfulness check (number:")
    g = await last_generation(backend)
    assert g.cancelled and not g.finished


async def test_every_slot_busy_answers_from_the_article(
    prepared: Prepared, state_dir: Path, scripted: Callable[..., ScriptedLLM]
) -> None:
    gate = threading.Event()
    backend = scripted(fixed(f"{GOOD_1} {GOOD_2}"), gate=gate)
    settings = _settings(prepared, state_dir, llm_parallel=1, llm_max_waiting=0)
    async with running(settings) as (server, stub):
        try:
            first = asyncio.create_task(converse(stub, CANADA))
            await _until(lambda: backend.active == 1)
            assert backend.active == 1  # the one slot is taken, its generation waiting on the gate
            deltas, busy = await converse(stub, "How long does shipping to Mexico take?")
            assert busy.answer_source == ARTICLE_SOURCE and busy.fallback_reason == "every LLM slot was busy"
            assert ROW in busy.answer and "".join(deltas) == busy.answer
            assert len(backend.generations) == 1  # the second question never reached the LLM
            assert server.metrics.registry.get_sample_value("chat_llm_overflow_total") == 1
        finally:
            gate.set()
        _, result = await first
    assert result.answer_source == LLM_SOURCE and result.answer == f"{GOOD_1} {GOOD_2}"


async def test_same_question_same_answer(
    prepared: Prepared, state_dir: Path, scripted: Callable[..., ScriptedLLM]
) -> None:
    refunds = "How long do refunds take?"
    texts = {
        CANADA: [f"{GOOD_1} {GOOD_2}"],
        refunds: [*held("We refund within 3-5 business days.", "You can return most items within 30 days.")],
    }
    backend = scripted(lambda question: texts[question])
    async with running(_settings(prepared, state_dir)) as (_, stub):
        for question, source in ((CANADA, LLM_SOURCE), (refunds, ARTICLE_SOURCE)):
            one = await converse(stub, question)
            two = await converse(stub, question)
            assert one[1].answer_source == source and bool(one[1].fallback_reason) == (source != LLM_SOURCE)
            assert one[0] == two[0] and one[1].answer == two[1].answer
            assert one[1].fallback_reason == two[1].fallback_reason
            assert backend.generations[-1].messages == backend.generations[-2].messages  # same evidence


async def test_llm_failure_mid_answer_keeps_what_passed(
    prepared: Prepared, state_dir: Path, scripted: Callable[..., ScriptedLLM]
) -> None:
    scripted(fixed(f"{GOOD_1} Exp"), error=GenerationError("connection reset by the LLM server"))
    async with running(_settings(prepared, state_dir)) as (server, stub):
        deltas, result = await converse(stub, CANADA)
        assert rewrites(server, "llm_failed") == 1
    assert deltas == [GOOD_1] and result.answer == GOOD_1 and result.answer_source == LLM_SOURCE
    assert result.fallback_reason == "the LLM failed: connection reset by the LLM server"
