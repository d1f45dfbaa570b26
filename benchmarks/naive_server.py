"""The naive baseline of benchmarks/compare.py (a benchmark, not the product): one FastAPI app
under uvicorn doing routerserve's retrieval work per request — base pass, routing, expert pass,
FAISS search over the same index shards, the doc lookup — with nothing batched across requests.
What an engineer writes first: a sync endpoint, so uvicorn runs requests in its thread pool
(torch and FAISS release the GIL), one process, the config's thread settings.

    .venv/bin/python benchmarks/naive_server.py --port 8010 [--set key=value ...] [--data-dir D]

Same model, adapters and pilots (the served generation), same index folder, same answer shape
(expert, hits) as POST /v1/retrieve.
"""

# no `from __future__ import annotations`: FastAPI reads the body type (defined in build_app) at run time

from pathlib import Path
from typing import Optional

import numpy as np
import typer

app_cli = typer.Typer(add_completion=False)


def build_app(cfg, data_dir: Path):
    from fastapi import FastAPI
    from pydantic import BaseModel, Field

    from actors.encoder import EncoderEngine
    from actors.index_store import DocStore, IndexManifest
    from actors.routed_encoder import RoutedEncoder
    from actors.search import ShardSearcher
    from serve.artifacts.experts import served_experts
    from serve.artifacts.index import require_index
    from serve.artifacts.models import encoder_settings, resolve_model

    folder = require_index(cfg, data_dir)
    manifest = IndexManifest.load(folder)
    _, adapters, pilots = served_experts(cfg)
    routed = RoutedEncoder(EncoderEngine(resolve_model(cfg.model.ref), adapters, encoder_settings(cfg)), pilots,
                           cfg.experts.policy)
    shards = [ShardSearcher(folder / s.file, s.offset, use_gpu="never", num_threads=cfg.search.num_threads,
                            factory=manifest.factory, defaults=cfg.search.knob_defaults(manifest.knobs), mmap=cfg.search.mmap)
              for s in manifest.shards]
    docs = DocStore(folder.parent / "docs.parquet")

    class Query(BaseModel):
        query: str = Field(..., min_length=1)
        top_k: int = Field(10, ge=1, le=100)

    api = FastAPI(title="naive retrieval baseline")

    @api.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "num_docs": len(docs)}

    @api.post("/v1/retrieve")
    def retrieve(req: Query) -> dict:
        q = routed.route_and_encode([req.query]).queries[0]
        parts = [s.search(q.embedding[None, :], req.top_k) for s in shards]
        scores = np.concatenate([p[0] for p in parts], axis=1)[0]
        ids = np.concatenate([p[1] for p in parts], axis=1)[0]
        order = np.argsort(-scores)[: req.top_k]
        hits = [docs.hit(int(ids[i]), float(scores[i]), False) for i in order if ids[i] >= 0]
        return {"expert": q.expert, "routing_scores": q.routing_scores, "hits": hits}

    return api


@app_cli.command()
def main(
    port: int = typer.Option(8010),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
):
    import uvicorn

    from serve.config import load_config

    cfg = load_config(None, set_).absolutized()
    uvicorn.run(build_app(cfg, cfg.resolve_data_dir(data_dir)), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    app_cli()
