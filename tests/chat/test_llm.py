"""LLM backends: the packaged SmolLM2 GGUF streaming through Converse, generation stopping when the
client cancels mid-stream, LLM product copy, and the Hugging Face loading path with a tiny model the
test builds and saves itself (random weights, local tokenizer: nothing is downloaded)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cbec.chat.v1 import chat_pb2

from services.chat.llm import LlamaCppBackend, TransformersBackend, load_backend
from tests.chat.conftest import Prepared, chat_settings, converse, running

QUESTION = "How long does shipping to Canada take?"


async def _until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 -- polls another thread's state
        await asyncio.sleep(0.05)


async def test_gguf_answer_streams_and_product_copy_uses_the_llm(prepared: Prepared, state_dir: Path) -> None:
    settings = chat_settings(prepared, state_dir, llm_backend="gguf", llm_max_tokens=24, llm_parallel=2)
    async with running(settings) as (server, stub):
        deltas, result = await converse(stub, QUESTION, market="CA")
        assert server.service.generations[-1].tokens >= 2  # type: ignore[attr-defined]
        assert result.language == "en" and "".join(deltas) == result.answer and result.answer.strip()
        # The small model's rewrite is sent only if it passed the faithfulness check; otherwise the
        # extractive answer (the North America row) is, and the result says why.
        if result.answer_source == chat_pb2.ANSWER_SOURCE_LLM:
            assert not result.fallback_reason
        else:
            assert result.answer_source == chat_pb2.ANSWER_SOURCE_ARTICLE
            assert result.fallback_reason.startswith("rewrite failed the faithfulness check")
            assert "6-10 business days" in result.answer
        # Spanish is not an LLM language: the Spanish article answers instead of invented text.
        _, es = await converse(stub, "¿Cuánto tarda el envío a México?")
        assert es.answer_source == chat_pb2.ANSWER_SOURCE_ARTICLE and "días hábiles" in es.answer
        copy = await stub.GenerateProductCopy(
            chat_pb2.GenerateProductCopyRequest(
                product=chat_pb2.ProductAttributes(
                    name="Trail running shoe", category="shoes", attributes={"material": "mesh"}, length_cm=30
                ),
                target_language="en",
                target_market="US",
            )
        )
        assert copy.generator == chat_pb2.COPY_GENERATOR_LLM and copy.description.strip()
        assert "Dimensions: 11.8 in" in copy.bullets  # facts stay templated and exact


async def test_client_cancel_stops_generation(prepared: Prepared, state_dir: Path) -> None:
    max_tokens = 400
    settings = chat_settings(
        prepared,
        state_dir,
        llm_backend="gguf",
        llm_max_tokens=max_tokens,
        llm_ignore_eos=True,
        llm_parallel=1,
    )
    async with running(settings) as (server, stub):
        service = server.service
        llm = service.slot.current.model.llm  # type: ignore[attr-defined]
        assert isinstance(llm, LlamaCppBackend)
        call = stub.Converse(chat_pb2.ConverseRequest(message=QUESTION), timeout=120)
        # Nothing is streamed before a whole sentence has passed the faithfulness check: leave as soon
        # as generation runs.
        await _until(lambda: llm.active == 1)
        call.cancel()
        await _until(lambda: bool(service.generations) and llm.active == 0)  # type: ignore[attr-defined]
        stats = service.generations[-1]  # type: ignore[attr-defined]
        assert stats.cancelled and stats.tokens < max_tokens
        # llama.cpp frees the slot right after the stream is dropped
        await _until(lambda: llm.metrics()["requests_processing"] == 0)
        counters = llm.metrics()
        assert counters["requests_processing"] == 0
        assert counters["tokens_predicted_total"] < max_tokens
        assert service.m_cancelled._value.get() == 1  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights and a word-level tokenizer, saved like a hub checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "order",
        "parcel",
        "ships",
        "in",
        "days",
        "refund",
        "return",
        "customer",
        "store",
        "shipping",
        "time",
        "question",
        "answer",
    ]
    vocab = {
        w: i
        for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "system:", "user:", "assistant:", *words])
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_backend_loads_streams_and_stops(tiny_hf_model: Path, no_network: None) -> None:
    backend = load_backend("hf", str(tiny_hf_model), frozenset({"en"}))
    assert isinstance(backend, TransformersBackend)
    messages = [{"role": "user", "content": "where is the parcel"}]
    pieces: list[str] = []
    stats = backend.generate(messages, 20, pieces.append, threading.Event(), ignore_eos=True)
    assert stats.tokens == 20 and not stats.cancelled and "".join(pieces).strip()
    cancel = threading.Event()

    def on_delta(text: str) -> None:
        if len(pieces) >= 3:
            cancel.set()
        pieces.append(text)

    pieces.clear()
    stats = backend.generate(messages, 300, on_delta, cancel, ignore_eos=True)
    assert stats.cancelled and stats.tokens < 300 and backend.active == 0


async def test_hf_backend_serves_converse(
    tiny_hf_model: Path, prepared: Prepared, state_dir: Path, no_network: None
) -> None:
    settings = chat_settings(
        prepared,
        state_dir,
        llm_backend="hf",
        llm_path=str(tiny_hf_model),
        llm_max_tokens=8,
        llm_ignore_eos=True,
    )
    async with running(settings) as (server, stub):
        deltas, result = await converse(stub, QUESTION)
        assert server.service.generations[-1].tokens >= 1  # type: ignore[attr-defined]
    # Random weights write random words: the check turns them away and the extractive answer is sent.
    assert "".join(deltas) == result.answer
    assert result.answer_source == chat_pb2.ANSWER_SOURCE_ARTICLE and result.fallback_reason


def test_missing_model_files_fail_loudly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_backend("gguf", str(tmp_path / "nope.gguf"), frozenset({"en"}))
    with pytest.raises(FileNotFoundError):
        load_backend("hf", str(tmp_path), frozenset({"en"}))
