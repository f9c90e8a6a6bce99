"""The OpenAI-compatible backend against a real llama.cpp HTTP server (xllamacpp's, in a subprocess,
serving the packaged SmolLM2 GGUF behind an API key): streaming, reproducible decoding, cancellation
that stops the server's generation, errors that become ``GenerationError``, the settings, and a chat
service configured with ``llm_backend=openai`` answering through Converse."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from services.chat.config import ChatSettings
from services.chat.llm import GenerationError, GenerationStats, OpenAIBackend, packaged_gguf
from services.chat.model import llm_from_settings
from tests.chat.conftest import Prepared, chat_settings, converse, running

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-llm-key-0123456789"
MESSAGES = [
    {"role": "system", "content": "You answer online shop customers in one short sentence."},
    {"role": "user", "content": "How long does shipping to Canada take?"},
]


@dataclass(frozen=True)
class LlamaServer:
    address: str  # http://127.0.0.1:PORT

    @property
    def url(self) -> str:
        return f"{self.address}/v1"

    def metrics(self) -> dict[str, float]:
        """llama.cpp's Prometheus counters (``requests_processing``, ``tokens_predicted_total``, ...)."""
        text = httpx.get(f"{self.address}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        out = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:"):
                name, _, value = line.partition(" ")
                out[name.removeprefix("llamacpp:")] = float(value)
        return out


def _until(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.chat.llama_server", str(packaged_gguf()), "--api-key", API_KEY],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("http://127.0.0.1:"), f"llama.cpp server did not start (exit {proc.poll()})"

        def healthy() -> bool:
            try:
                return httpx.get(f"{address}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert _until(healthy), "llama.cpp server never became healthy"
        yield LlamaServer(address)
    finally:
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def backend(url: str, **kwargs: object) -> OpenAIBackend:
    return OpenAIBackend(url, frozenset({"en"}), **{"api_key": API_KEY, "timeout_s": 30.0, **kwargs})  # type: ignore[arg-type]


def generate(
    llm: OpenAIBackend, max_tokens: int = 24, cancel_after: int = 0, ignore_eos: bool = False
) -> tuple[list[str], GenerationStats]:
    deltas: list[str] = []
    cancel = threading.Event()

    def on_delta(text: str) -> None:
        deltas.append(text)
        if cancel_after and len(deltas) >= cancel_after:
            cancel.set()

    stats = llm.generate(MESSAGES, max_tokens, on_delta, cancel, ignore_eos)
    return deltas, stats


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_streams_deltas_and_decodes_reproducibly(llama: LlamaServer) -> None:
    llm = backend(llama.url)  # no model name: the one the server lists is used
    try:
        deltas, stats = generate(llm)
        text = "".join(deltas)
        assert len(deltas) >= 2 and text.strip()
        assert 1 <= stats.tokens <= 24 and stats.finish_reason in ("stop", "length")
        assert stats.first_token_s is not None and not stats.cancelled and llm.active == 0
        # Another question in between, then the same one: the same answer, word for word.
        other = [MESSAGES[0], {"role": "user", "content": "Can I return a jacket I bought last week?"}]
        llm.generate(other, 24, lambda _t: None, threading.Event())
        again, _ = generate(llm)
        assert "".join(again) == text
    finally:
        llm.close()


def test_cancel_stops_the_servers_generation(llama: LlamaServer) -> None:
    max_tokens = 400
    llm = backend(llama.url)
    try:
        before = llama.metrics()["tokens_predicted_total"]
        deltas, stats = generate(llm, max_tokens, cancel_after=1, ignore_eos=True)
        assert stats.cancelled and stats.finish_reason == "cancelled"
        assert 1 <= len(deltas) == stats.tokens < max_tokens
        # The dropped stream freed the server's slot long before the 400 tokens it was asked for.
        assert _until(lambda: llama.metrics()["requests_processing"] == 0)
        assert llama.metrics()["tokens_predicted_total"] - before < max_tokens
    finally:
        llm.close()


def test_unreachable_server_is_a_generation_error() -> None:
    llm = backend(f"http://127.0.0.1:{free_port()}/v1", model="smollm2", timeout_s=5.0)
    deltas: list[str] = []
    with pytest.raises(GenerationError, match="Connection error"):
        llm.generate(MESSAGES, 8, deltas.append, threading.Event())
    assert deltas == [] and llm.active == 0


@pytest.mark.parametrize(
    ("url_suffix", "key", "complaint"),
    [("/nope/v1", API_KEY, "404"), ("/v1", "wrong-key", "401")],
    ids=["wrong path", "wrong key"],
)
def test_http_errors_are_generation_errors(
    llama: LlamaServer, url_suffix: str, key: str, complaint: str
) -> None:
    llm = backend(llama.address + url_suffix, model="smollm2", api_key=key)
    deltas: list[str] = []
    with pytest.raises(GenerationError, match=complaint):
        llm.generate(MESSAGES, 8, deltas.append, threading.Event())
    assert deltas == [] and llm.active == 0


def test_settings_select_the_backend_and_keep_the_key_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CBEC_CHAT_LLM_BACKEND", "openai")
    monkeypatch.setenv("CBEC_CHAT_LLM_URL", "http://vllm.llm.svc:8000/v1")
    monkeypatch.setenv("CBEC_CHAT_LLM_MODEL", "qwen2.5-7b-instruct")
    monkeypatch.setenv("CBEC_CHAT_LLM_API_KEY", API_KEY)
    monkeypatch.setenv("CBEC_CHAT_LLM_TIMEOUT_S", "12.5")
    settings = ChatSettings(models_dir=tmp_path)
    assert settings.llm_api_key.get_secret_value() == API_KEY
    assert API_KEY not in repr(settings) and API_KEY not in settings.model_dump_json()
    llm = llm_from_settings(settings, "cpu")
    assert isinstance(llm, OpenAIBackend) and llm.name == "openai:qwen2.5-7b-instruct"
    llm.close()
    with pytest.raises(ValidationError, match="CBEC_CHAT_LLM_URL"):
        ChatSettings(models_dir=tmp_path, llm_url="vllm:8000")
    with pytest.raises(ValueError, match="CBEC_CHAT_LLM_URL"):
        llm_from_settings(ChatSettings(models_dir=tmp_path, llm_url=""), "cpu")


async def test_chat_service_answers_through_the_openai_backend(
    llama: LlamaServer, prepared: Prepared, state_dir: Path
) -> None:
    settings = chat_settings(
        prepared,
        state_dir,
        llm_backend="openai",
        llm_url=llama.url,
        llm_api_key=API_KEY,
        llm_max_tokens=24,
    )
    async with running(settings) as (server, stub):
        llm = server.service.slot.current.model.llm  # type: ignore[attr-defined]
        assert isinstance(llm, OpenAIBackend) and llm.url == llama.url
        deltas, result = await converse(stub, "How long does shipping to Canada take?", market="CA")
        assert result.language == "en" and result.answer.strip()
        assert "".join(deltas) == result.answer
