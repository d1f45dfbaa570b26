"""Builder functions: the only things a Serve ``import_path`` points to.

    import_path: serve.app.builders:build_app
    args: {config: <RouterServeConfig as a dict>, data_dir: <path>}

The builder resolves the model, finds the built index and the expert artifacts (serve.artifacts),
and binds the deployment graph: each deployment with its Serve options and its one settings
object (serve.app.settings), by keyword. It never builds anything: the index and the experts are
made offline (serve.offline) before the app starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from actors.index_store import DOCS_FILE, IndexManifest

from serve.artifacts.experts import enabled_experts, generation_store, served_generation
from serve.artifacts.index import require_index
from serve.artifacts.models import encoder_settings, resolve_model
from serve.config import RouterServeConfig, config_from_dict, load_config

from .deployments import (
    ExpertEncoderDeployment,
    LLMEngineDeployment,
    RetrievalIngress,
    RouterR1ControllerDeployment,
    SearchShardDeployment,
)
from .settings import (
    CONTROLLER,
    ENCODER,
    INGRESS,
    AdminJobSettings,
    ControllerSettings,
    EncoderDeploymentSettings,
    EngineDeploymentSettings,
    IngressSettings,
    ShardDeploymentSettings,
    deployment_options,
    llm_engine_name,
    shard_name,
)


def chat_model_names(llm) -> list[str]:
    return ([llm.router.served_name] if llm.router else []) + [c.name for c in llm.candidates]


def build_chat(cfg: RouterServeConfig, options: dict[str, dict]):
    """The Router-R1 half: one deployment per LLM engine and the controller over them."""
    llm = cfg.llm
    engines = {
        name: LLMEngineDeployment.options(name=llm_engine_name(name), **options[llm_engine_name(name)]).bind(
            settings=EngineDeploymentSettings(name=name, engine=engine, model_cache_dir=str(llm.model_cache_dir),
                                              model_cache_writable=llm.model_cache_writable)
        )
        for name, engine in llm.engines.items()
    }
    return RouterR1ControllerDeployment.options(name=CONTROLLER, **options[CONTROLLER]).bind(
        settings=ControllerSettings(llm=llm), engines=engines
    )


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
    gen = served_generation(cfg)  # the pinned or current generation must exist
    if gen is not None:
        gen.adapters(cfg.experts.enabled)  # and hold every expert experts.enabled names
    store = generation_store(cfg)
    if store is not None and cfg.experts.generation == "current" and store.current_id() is None and enabled_experts(cfg):
        raise FileNotFoundError(f"experts {sorted(enabled_experts(cfg))} are in the draft under {cfg.experts.dir} but no "
                                "generation is published: run `routerserve experts publish`")
    options = deployment_options(cfg)
    d = cfg.deployments
    encoder = ExpertEncoderDeployment.options(name=ENCODER, **options[ENCODER]).bind(
        settings=EncoderDeploymentSettings(
            model_path=str(resolve_model(cfg.model.ref)),
            experts_dir=str(store.root) if store is not None else None,
            enabled=cfg.experts.enabled,
            watch_interval_s=cfg.experts.watch_interval_s,
            encoder=encoder_settings(cfg),
            policy=cfg.experts.policy,
            base_model_ref=cfg.model.ref,
            batching=d.encoder_batching,
            stuck_after_s=cfg.limits.stuck_after_s,
        )
    )
    search_defaults = cfg.search.knob_defaults(manifest.knobs)  # the index's knobs, configured values
    shards = [
        SearchShardDeployment.options(name=shard_name(i), **options[shard_name(i)]).bind(
            settings=ShardDeploymentSettings(
                index_path=str(folder / entry.file), offset=entry.offset,
                factory=manifest.factory, search_defaults=search_defaults, mmap=cfg.search.mmap,
                use_gpu=cfg.search.use_gpu, num_threads=cfg.search.num_threads,
                stuck_after_s=cfg.limits.stuck_after_s,
            )
        )
        for i, entry in enumerate(manifest.shards)
    ]
    return RetrievalIngress.options(name=INGRESS, **options[INGRESS]).bind(
        settings=IngressSettings(
            docs_path=str(Path(folder).parent / DOCS_FILE),
            limits=cfg.limits,
            served_name=cfg.model.served_name,
            dim=manifest.dim,
            index_factory=manifest.factory,
            search_defaults=search_defaults,
            unknown_corpus_share=cfg.experts.unknown_corpus_share,
            corpora=list(manifest.datasets),
            batching=d.ingress_batching,
            api_keys_env=cfg.http.api_keys_env,
            admin_keys_env=cfg.http.admin_keys_env,
            admin_open=cfg.http.admin_open,
            experts_dir=str(store.root) if store is not None else None,
            generation_pin=cfg.experts.generation,
            jobs=AdminJobSettings(
                config=cfg.model_dump(mode="json"), data_dir=str(data_dir),
                register_root=str(cfg.experts.register_root_path()), model_path=str(resolve_model(cfg.model.ref)),
                timeout_s=cfg.experts.job_timeout_s, threads=cfg.experts.job_threads,
            ) if store is not None else None,
            chat_models=chat_model_names(cfg.llm) if cfg.llm.enabled else [],
        ),
        encoder=encoder,
        shards=shards,
        chat=build_chat(cfg, options) if cfg.llm.enabled else None,
    )
