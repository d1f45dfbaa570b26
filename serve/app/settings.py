"""Deployment names and the settings object each deployment is constructed with.

The names are defined here once; the builder (serve.app.builders), the Serve YAML
(serve.deploy.serve_config) and the KubeRay render (serve.deploy.k8s, through the Serve YAML) all
take them from ``deployment_options``. Each deployment gets one settings object, by keyword,
built from the config by the builder.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict

from actors.encoder import EncoderSettings

from serve.config import BatchConfig, LimitsConfig, LLMConfig, LLMEngineConfig, RouterServeConfig

INGRESS = "RetrievalIngress"
ENCODER = "ExpertEncoder"
CONTROLLER = "RouterR1Controller"


def shard_name(i: int) -> str:
    return f"SearchShard{i}"


def llm_engine_name(engine: str) -> str:
    return f"LLM-{engine}"


def engine_options(engine: LLMEngineConfig) -> dict:
    """The engine's Serve options with its ``env`` merged into the replicas' runtime_env."""
    opts = copy.deepcopy(engine.deployment)
    if engine.env:
        actor = opts.setdefault("ray_actor_options", {})
        runtime_env = actor.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **engine.env}
    return opts


def deployment_options(cfg: RouterServeConfig) -> dict[str, dict[str, Any]]:
    """Every deployment of the app, by name, with its Serve options (ingress first)."""
    d = cfg.deployments
    encoder = copy.deepcopy(d.encoder)
    # the expert generation every encoder replica serves: Serve hands it to reconfigure() on each
    # replica, now and on every replica that starts later (serve.app.live_experts)
    encoder["user_config"] = {**(encoder.get("user_config") or {}), "generation": cfg.experts.generation}
    out = {INGRESS: copy.deepcopy(d.ingress), ENCODER: encoder}
    out.update({shard_name(i): copy.deepcopy(d.shard) for i in range(cfg.index.num_shards)})
    if cfg.llm.enabled:
        out.update({llm_engine_name(n): engine_options(e) for n, e in cfg.llm.engines.items()})
        out[CONTROLLER] = copy.deepcopy(cfg.llm.controller)
    return out


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderDeploymentSettings(_Settings):
    """ExpertEncoder: the base model and the expert store. Which generation of experts a replica
    serves is not here: it is the deployment's user_config (serve.app.live_experts), so a switch
    never changes the replicas' constructor arguments."""

    model_path: str
    experts_dir: str | None  # the expert store (generations + CURRENT.json); None: the base model only
    enabled: list[str] | None  # experts.enabled: only these of a generation's experts
    watch_interval_s: float  # experts.watch_interval_s
    encoder: EncoderSettings
    policy: str
    base_model_ref: str
    batching: BatchConfig
    stuck_after_s: float  # limits.stuck_after_s: the health check fails past it (serve.app.health)


class ShardDeploymentSettings(_Settings):
    """SearchShard<i>: one FAISS shard file and the global row id of its first vector."""

    index_path: str
    offset: int
    factory: str = "Flat"  # index.factory (the manifest's): reported in answers and metrics
    search_defaults: dict[str, int] = {}  # search.nprobe / ef_search, the ones this index has
    mmap: bool = False  # search.mmap
    use_gpu: str
    num_threads: int | None
    stuck_after_s: float  # limits.stuck_after_s


class AdminJobSettings(_Settings):
    """The admin API's jobs (serve.app.admin.jobs): what their command needs."""

    config: dict[str, Any]  # the service's config, as the job's command reads it
    data_dir: str
    register_root: str  # experts.register_root: adapters registered through the API lie under it
    model_path: str  # the base model folder: an adapter's shapes are checked against it
    timeout_s: float = 3600.0
    threads: int = 1
    ray_address: str | None = None  # None: the cluster the ingress runs in


class IngressSettings(_Settings):
    """RetrievalIngress: the doc store, request limits, the served model name, batching, API keys."""

    docs_path: str
    limits: LimitsConfig
    served_name: str
    dim: int  # the index's embedding size, declared in the API's request models
    index_factory: str = "Flat"  # the shards' index type, in every /v1/retrieve answer
    search_defaults: dict[str, int] = {}  # its search knobs' configured values: requests may set only these
    unknown_corpus_share: float | None = None  # experts.unknown_corpus_share: the corpus guard (None: off)
    corpora: list[str] = []  # the index's datasets (its manifest): what the corpus guard matches experts to
    batching: BatchConfig
    api_keys_env: str | None = None
    admin_keys_env: str | None = None  # http.admin_keys_env: the admin API's own keys
    admin_open: bool = False  # http.admin_open: the admin API without keys (loopback hosts only)
    experts_dir: str | None = None  # the expert store the admin API activates generations in
    generation_pin: str = "current"  # experts.generation: a pinned service refuses admin activation
    jobs: AdminJobSettings | None = None  # register / train through the admin API (None: those routes answer 409)
    chat_models: list[str] = []  # the served chat model names (router, candidates): the spec's examples


class EngineDeploymentSettings(_Settings):
    """LLM-<engine>: one router or candidate engine."""

    name: str
    engine: LLMEngineConfig
    model_cache_dir: str
    model_cache_writable: bool = True  # llm.model_cache_writable: false on the cluster (read-only volume)


class ControllerSettings(_Settings):
    """RouterR1Controller: the llm section (router, candidates, prices, limits)."""

    llm: LLMConfig
