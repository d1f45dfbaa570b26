"""Builder functions: the only things a Serve ``import_path`` points to.

    import_path: serve.builders:build_app
    args: {config: <RouterServeConfig as a dict>, data_dir: <path>}

The builder resolves the model, finds the built index and the expert artifacts, and binds the
deployment graph with the Serve options from the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.index_store import DOCS_FILE, IndexManifest
from ray.serve import Application

from .config import RouterServeConfig, config_from_dict, load_config
from .deployments import (
    ExpertEncoderDeployment,
    LLMEngineDeployment,
    RetrievalIngress,
    RouterR1ControllerDeployment,
    SearchShardDeployment,
)
from .experts import enabled_experts, pilots_path
from .indexing import encoder_settings, require_index
from .models import resolve_model

INGRESS = "RetrievalIngress"
ENCODER = "ExpertEncoder"
CONTROLLER = "RouterR1Controller"


def llm_engine_name(engine: str) -> str:
    return f"LLM-{engine}"


def engine_options(engine) -> dict:
    """The engine's Serve options with its ``env`` merged into the replicas' runtime_env."""
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in engine.deployment.items()}
    if engine.env:
        actor = dict(opts.get("ray_actor_options") or {})
        runtime_env = dict(actor.get("runtime_env") or {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **engine.env}
        actor["runtime_env"] = runtime_env
        opts["ray_actor_options"] = actor
    return opts


def build_chat(cfg: RouterServeConfig):
    """The Router-R1 half: one deployment per LLM engine and the controller over them."""
    llm = cfg.llm
    engines = {
        name: LLMEngineDeployment.options(name=llm_engine_name(name), **engine_options(e)).bind(
            name, e.model_dump(mode="json"), str(llm.model_cache_dir)
        )
        for name, e in llm.engines.items()
    }
    return RouterR1ControllerDeployment.options(name=CONTROLLER, **llm.controller).bind(llm.model_dump(mode="json"), engines)


def shard_name(i: int) -> str:
    return f"SearchShard{i}"


def _config_from_args(args: dict[str, Any]) -> RouterServeConfig:
    if "config" in args:
        cfg = args["config"]
        return cfg if isinstance(cfg, RouterServeConfig) else config_from_dict(cfg)
    return load_config(args.get("config_path"))


def build_app(args: dict[str, Any]) -> Application:
    cfg = _config_from_args(args).absolutized()
    data_dir = cfg.resolve_data_dir(args.get("data_dir"))
    folder = require_index(cfg, data_dir)
    manifest = IndexManifest.load(folder)
    model_path = resolve_model(cfg.model.ref)
    adapters = {name: str(path) for name, path in enabled_experts(cfg).items()}
    pilots = pilots_path(cfg)
    if adapters and (pilots is None or not pilots.is_file()):
        raise FileNotFoundError(f"experts {sorted(adapters)} have adapters but no pilots file at {pilots}")
    d = cfg.deployments
    encoder = ExpertEncoderDeployment.options(name=ENCODER, **d.encoder).bind(
        str(model_path),
        adapters,
        str(pilots) if adapters else None,
        encoder_settings(cfg),
        cfg.experts.policy,
        cfg.model.ref,
        d.encoder_batching.model_dump(),
    )
    shards = [
        SearchShardDeployment.options(name=shard_name(i), **d.shard).bind(
            str(folder / entry.file), entry.offset, cfg.search.use_gpu, cfg.search.num_threads
        )
        for i, entry in enumerate(manifest.shards)
    ]
    return RetrievalIngress.options(name=INGRESS, **d.ingress).bind(
        encoder,
        shards,
        str(Path(folder).parent / DOCS_FILE),
        cfg.limits.model_dump(),
        cfg.model.served_name,
        d.ingress_batching.model_dump(),
        build_chat(cfg) if cfg.llm.enabled else None,
        cfg.http.api_keys_env,
    )
