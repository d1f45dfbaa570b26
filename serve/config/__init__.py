"""The configuration: one model (``RouterServeConfig``) drives the local run, the Serve YAML and
the KubeRay manifest. Split by concern — ``core`` (model, index, experts, HTTP, limits, Serve
options, Ray), ``llm`` (engines, router, candidates), ``k8s`` (the cluster render) — and
``loading`` (YAML + dotted overrides, errors naming the key). Imports nothing from the rest of
``serve``."""

from .common import DATA_DIR_ENV, DEFAULT_CONFIG, REPO_ROOT, ConfigError
from .core import (
    BatchConfig,
    CorpusConfig,
    DeploymentsConfig,
    ExpertsConfig,
    ExpertTrainConfig,
    GENERATION_ID_PATTERN,
    HTTPConfig,
    IndexConfig,
    LimitsConfig,
    ModelConfig,
    RayConfig,
    RouterServeConfig,
    SearchConfig,
)
from .k8s import K8sConfig
from .llm import CandidateConfig, LLMConfig, LLMEngineConfig, PriceConfig, RouterConfig
from .loading import config_from_dict, load_config

__all__ = [
    "DATA_DIR_ENV", "DEFAULT_CONFIG", "REPO_ROOT", "ConfigError", "BatchConfig", "CorpusConfig", "DeploymentsConfig",
    "ExpertsConfig", "ExpertTrainConfig", "GENERATION_ID_PATTERN", "HTTPConfig", "IndexConfig", "LimitsConfig", "ModelConfig", "RayConfig",
    "RouterServeConfig", "SearchConfig", "K8sConfig", "CandidateConfig", "LLMConfig", "LLMEngineConfig", "PriceConfig",
    "RouterConfig", "config_from_dict", "load_config",
]
