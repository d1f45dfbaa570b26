"""The in-process retrieval stack (no Ray): real encoder, real FAISS shards, real docs, served by
the same FastAPI app the ingress runs. Shared by the retrieval service tests and the API contract
tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from actors.beir import iter_corpus
from actors.index_store import DocStore
from actors.routed_encoder import RoutedEncoder
from actors.search import ShardSearcher, build_flat_index, split_ranges
from serve.app.ingress import create_app
from serve.app.retrieval.service import LocalEncoderClient, LocalShardClient, RetrievalService
from serve.config import LimitsConfig

REPO = Path(__file__).resolve().parents[3]
SCHEMATHESIS_CONFIG = REPO / "benchmarks" / "schemathesis.toml"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, engine, data_dir, mean_pilots):
    docs = list(iter_corpus(data_dir, "scifact", 60))
    path = tmp_path_factory.mktemp("docs") / "docs.parquet"
    DocStore.write(path, docs)
    vectors = engine.encode([d.as_passage() for d in docs])
    pilots = mean_pilots(engine, {"alpha": ["cell biology", "protein"], "beta": ["debate", "policy"]})
    routed = RoutedEncoder(engine, pilots)
    shards = [ShardSearcher(index=build_flat_index(vectors[a:b]), offset=a) for a, b in split_ranges(len(docs), 3)]
    service = RetrievalService(
        LocalEncoderClient(routed, "test-model"),
        [LocalShardClient(s) for s in shards],
        DocStore(path),
        LimitsConfig(max_query_chars=200, max_top_k=20, max_embedding_inputs=4),
        "mini",
        dim=vectors.shape[1],
    )
    return {"client": TestClient(create_app(service)), "docs": docs, "vectors": vectors, "engine": engine, "service": service}


@pytest.fixture(scope="session")
def schemathesis_cli():
    """``schemathesis_cli(url, out_dir, *args)``: the schemathesis CLI as a user runs it, with the
    project's config (benchmarks/schemathesis.toml) and ``--checks all``; JUnit report in out_dir."""

    def run(url: str, out: Path, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(SCHEMATHESIS_CONFIG), "run",
               f"{url}/openapi.json", "--checks", "all", "--workers", "1", "--request-timeout", "60",
               "--report", "junit", "--report-dir", str(out), "--seed", "1", *args]
        env = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)

    return run


def _small_served_config(root: Path, port: int, num_shards: int, default_domains: list[str], **sections):
    """The retrieval e2e modules' config: scifact + nfcorpus capped at 120 docs each, short expert
    training, ``sections`` merged over it one section deep (e.g. ``experts={...}``)."""
    from serve.config import config_from_dict

    data = {
        "model": {"max_seq_length": 128},
        "corpus": {"datasets": ["scifact", "nfcorpus"], "max_docs_per_dataset": 120},
        "index": {"dir": str(root / "index"), "num_shards": num_shards, "chunk_size": 64, "encode_workers": 1},
        "experts": {
            "dir": str(root / "experts"),
            "training": {"default_domains": default_domains, "steps": 4, "max_queries": 24, "batch_size": 8},
            # 4-step experts rarely beat base: the routing mechanics are driven with the paper's bare
            # rule here; the confidence floor and the base guard have their own tests
            "confidence_quantile": None,
            "base_guard": False,
        },
        "http": {"port": port},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data).absolutized()


def _start_served(cfg, data_dir: Path) -> str:
    """The app on Serve as `routerserve up` starts it (the proxy's backstop deadline too); its URL
    once /healthz answers 200."""
    from ray import serve

    from serve.app.builders import build_app
    from serve.cli.common import wait_healthy
    from serve.deploy.serve_config import http_options

    serve.start(http_options=http_options(cfg))
    serve.run(build_app({"config": cfg, "data_dir": str(data_dir)}), name=cfg.app_name, route_prefix="/")
    url = f"http://127.0.0.1:{cfg.http.port}"
    wait_healthy(url, 120)
    return url


@pytest.fixture(scope="session")
def small_served_config():
    """``small_served_config(root, port, num_shards, default_domains, **sections)``: see above."""
    return _small_served_config


@pytest.fixture(scope="session")
def start_served():
    """``start_served(cfg, data_dir)`` → the URL of the app on Serve, healthy."""
    return _start_served
