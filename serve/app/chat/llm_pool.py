"""Engines and tokenizers from the `llm` config: the one place that turns an engine entry into an
``actors.llm_engines`` object (used by the Serve engine deployment, the controller and benchmarks)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from actors.llm_engines import (
    LLMEngine,
    OpenAIEngine,
    RetrieverEngine,
    TransformersEngine,
    VLLMEngine,
    count_with,
    render_chat,
)

from serve.artifacts.llm_models import resolve_llm
from serve.config import LLMConfig, LLMEngineConfig


def engine_model_path(engine: LLMEngineConfig, cache_dir: Path, writable: bool = True) -> Path | None:
    """The local model folder of a vllm/transformers engine (converted from GGUF once, cached);
    for an openai engine, its optional local tokenizer folder. ``writable``: llm.model_cache_writable."""
    if engine.kind == "retriever":
        return None
    if engine.kind == "openai":
        return None if engine.tokenizer is None else resolve_llm(engine.tokenizer, cache_dir, writable)
    return resolve_llm(engine.model, cache_dir, writable)


def make_engine(name: str, engine: LLMEngineConfig, cache_dir: Path, writable: bool = True) -> LLMEngine:
    if engine.kind == "retriever":
        return RetrieverEngine(engine.base_url, engine.model, model_id=name, api_key_env=engine.api_key_env,
                               **engine.engine_kwargs)
    if engine.kind == "openai":
        tok = engine_model_path(engine, cache_dir, writable)
        return OpenAIEngine(engine.base_url, engine.model, engine.api_key_env, str(tok) if tok else None, model_id=name)
    path = engine_model_path(engine, cache_dir, writable)
    if engine.kind == "transformers":
        return TransformersEngine(path, model_id=name, num_threads=engine.num_threads,
                                  chat_template=engine.chat_template, chat_stop=engine.chat_stop)
    return VLLMEngine(path, model_id=name, chat_template=engine.chat_template, chat_stop=engine.chat_stop,
                      engine_metrics=engine.engine_metrics, **engine.engine_kwargs)


def load_tokenizers(llm: LLMConfig) -> dict[str, object]:
    """A Hugging Face tokenizer per engine that has a local model (or tokenizer) folder."""
    from transformers import AutoTokenizer

    out = {}
    for name, engine in llm.engines.items():
        path = engine_model_path(engine, Path(llm.model_cache_dir), llm.model_cache_writable)
        if path is not None:
            out[name] = AutoTokenizer.from_pretrained(str(path))
    return out


def prompt_counters(tokenizers: dict[str, object], llm: LLMConfig) -> dict[str, Callable[[list[dict]], int]]:
    """Per engine with a local tokenizer: the exact prompt tokens of a message list (its chat
    template applied, generation prompt added), to bound a call's cost before it is made."""
    return {name: functools.partial(_count_messages, tok, llm.engines[name].chat_template) for name, tok in tokenizers.items()}


def _count_messages(tokenizer, template: str | None, messages: list[dict]) -> int:
    return count_with(tokenizer, render_chat(tokenizer, messages, template=template))


def chat_template(tokenizer, template: str | None = None) -> Callable[[list[dict]], str]:
    return functools.partial(render_chat, tokenizer, template=template)
