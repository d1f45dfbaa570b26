"""Expert artifacts: adding/removing an expert leaves the others and the index untouched."""

import hashlib

import numpy as np
import pytest

from actors.beir import load_qrels, seeded_half_split
from actors.routing import PilotSet
from serve.config import config_from_dict
from serve.experts import (
    enabled_experts,
    load_pilots,
    remove_expert,
    train_domain_expert,
    training_queries,
)


def _folder_hash(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict(
        {
            "model": {"max_seq_length": 64},
            "experts": {"dir": str(tmp_path / "experts"), "bootstrap": {"steps": 2, "max_queries": 8, "batch_size": 4}},
        }
    )


def test_add_and_remove_experts_independently(cfg, data_dir):
    train_domain_expert(cfg, data_dir, "scifact", progress=False)
    first = _folder_hash(enabled_experts(cfg)["scifact"])
    first_pilots = load_pilots(cfg).restrict(["scifact"]).embeddings.copy()
    train_domain_expert(cfg, data_dir, "nfcorpus", progress=False)
    assert sorted(enabled_experts(cfg)) == ["nfcorpus", "scifact"]
    assert _folder_hash(enabled_experts(cfg)["scifact"]) == first
    pilots = load_pilots(cfg)
    assert pilots.expert_names == ["scifact", "nfcorpus"]
    np.testing.assert_array_equal(pilots.restrict(["scifact"]).embeddings, first_pilots)
    report = (enabled_experts(cfg)["nfcorpus"] / "train_report.json").read_text()
    assert '"num_queries": 8' in report
    remove_expert(cfg, "scifact")
    assert list(enabled_experts(cfg)) == ["nfcorpus"]
    assert load_pilots(cfg).expert_names == ["nfcorpus"]
    with pytest.raises(FileNotFoundError):
        remove_expert(cfg, "scifact")


def test_enabled_list_must_exist(cfg):
    cfg.experts.enabled = ["ghost"]
    with pytest.raises(FileNotFoundError, match="ghost"):
        enabled_experts(cfg)


def test_training_queries_use_train_split_or_the_seeded_train_half(data_dir):
    sci = training_queries(data_dir, "scifact", 10_000)
    train_ids = set(load_qrels(data_dir, "scifact", "train"))
    assert sci and {q for q, _, _ in sci} <= train_ids
    if (data_dir / "cranfield").is_dir():
        cran = training_queries(data_dir, "cranfield", 10_000)
        judged = sorted(load_qrels(data_dir, "cranfield", "test"))
        train_half, test_half = seeded_half_split(judged)
        assert {q for q, _, _ in cran} <= set(train_half)
        assert not {q for q, _, _ in cran} & set(test_half)
        assert 0.35 < len(train_half) / len(judged) < 0.65


def test_seeded_split_is_deterministic_and_order_free():
    ids = [str(i) for i in range(200)]
    a = seeded_half_split(ids)
    b = seeded_half_split(list(reversed(ids)))
    assert sorted(a[0]) == sorted(b[0]) and not set(a[0]) & set(a[1])
