"""Expert artifacts: adding/removing an expert leaves the others and the index untouched."""

import hashlib
import json
import os

import numpy as np
import pytest

from actors.beir import load_qrels, seeded_half_split
from serve.config import config_from_dict
from serve.artifacts.experts import adapters_root, enabled_experts, generation_store, load_pilots
from serve.offline.ir import training_queries
from serve.artifacts.experts import remove_expert
from serve.offline.training import adapter_settings, add_expert, train_domain_expert


def _folder_hash(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def cfg(tmp_path, ray_session):
    return config_from_dict(
        {
            "model": {"max_seq_length": 64},
            "corpus": {"max_docs_per_dataset": 300},
            "index": {"dir": str(tmp_path / "index"), "encode_workers": 1},
            "experts": {
                "dir": str(tmp_path / "experts"),
                "training": {"steps": 3, "max_queries": 8, "batch_size": 4, "hard_negatives": 2},
            },
        }
    )


def test_add_and_remove_experts_independently(cfg, data_dir):
    train_domain_expert(cfg, data_dir, "scifact", progress=False)
    first = _folder_hash(enabled_experts(cfg)["scifact"])
    first_pilots = load_pilots(cfg).embeddings.copy()
    assert load_pilots(cfg).domains == ["scifact"] and load_pilots(cfg).experts == ["scifact"]
    calls = []  # an admin job's progress: (stage, done, total)
    train_domain_expert(cfg, data_dir, "nfcorpus", progress=False, on_progress=lambda *a: calls.append(a))
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert stages == ["base vectors of nfcorpus", "training", "pilots of nfcorpus", "publishing"], stages
    assert ("base vectors of nfcorpus", 300, 300) in calls and calls.count(("training", 3, 3)) == 1
    assert sorted(enabled_experts(cfg)) == ["nfcorpus", "scifact"]
    assert _folder_hash(enabled_experts(cfg)["scifact"]) == first
    pilots = load_pilots(cfg)
    assert set(pilots.domains) == {"scifact", "nfcorpus"} and set(pilots.expert_names) <= {"scifact", "nfcorpus"}
    # scifact's pilots were built before nfcorpus existed and are kept as they were
    scifact_rows = [i for i, d in enumerate(pilots.domains) if d == "scifact"]
    np.testing.assert_array_equal(pilots.embeddings[scifact_rows], first_pilots)
    report = json.loads((enabled_experts(cfg)["nfcorpus"] / "train_report.json").read_text())
    assert report["num_queries"] == 8 and report["objective"] == "full_corpus" and report["corpus_size"] == 300
    assert len(report["losses"]) == 3 and report["domain"] == "nfcorpus" and len(report["data_hash"]) == 64
    assert (enabled_experts(cfg)["nfcorpus"] / "loss.png").stat().st_size > 0
    store = generation_store(cfg)  # each change was published as the current generation
    g1, g2 = store.list()
    assert g1.experts == ["scifact"] and sorted(g2.experts) == ["nfcorpus", "scifact"] and store.current_id() == g2.id
    remove_expert(cfg, "scifact")
    assert list(enabled_experts(cfg)) == ["nfcorpus"]
    assert load_pilots(cfg).expert_names == ["nfcorpus"]  # pilots pointing to the removed expert are gone
    g3 = store.current()
    assert g3.experts == ["nfcorpus"] and g3.load_pilots().expert_names == ["nfcorpus"]
    # the generation a running service may still serve keeps its own copy of the removed expert
    assert _folder_hash(g2.adapters()["scifact"]) == first and "scifact" in g2.load_pilots().expert_names
    g2.verify()
    with pytest.raises(FileNotFoundError):
        remove_expert(cfg, "scifact")
    assert store.current_id() == g3.id  # a failed remove publishes nothing


def test_pilots_record_their_grouping_rule_and_are_rebuilt_when_the_config_changes(cfg, data_dir):
    from serve.offline.beir_eval import evaluate
    from serve.offline.training import train_default_experts
    from serve.artifacts.experts import pilot_rule
    from serve.offline.pilots import build_pilots

    train_domain_expert(cfg, data_dir, "scifact", progress=False)
    train_domain_expert(cfg, data_dir, "nfcorpus", progress=False)
    assert load_pilots(cfg).rule == pilot_rule(cfg) == ("best_expert margin=0 min_queries=1 confidence_quantile=0.1 "
                                                         "confidence_floor=member base_guard")
    margin = cfg.model_copy(deep=True)
    margin.experts.pilot_margin, margin.experts.pilot_min_queries = 0.5, 10
    # the evaluation refuses pilots grouped by another rule than the one it would report
    with pytest.raises(ValueError, match="'best_expert margin=0 min_queries=1 confidence_quantile=0.1 confidence_floor=member "
                                         "base_guard'.*routerserve pilots build"):
        evaluate(margin, data_dir, ["scifact"], ["pilot_mean"], max_queries=2, progress=False)
    # rebuilding one domain under the new rule rebuilds every domain: the file never mixes rules
    wins = build_pilots(margin, data_dir, ["nfcorpus"], progress=False)
    assert sorted(wins) == ["nfcorpus", "scifact"]
    pilots = load_pilots(margin)
    assert pilots.rule == "best_expert margin=0.5 min_queries=10 confidence_quantile=0.1 confidence_floor=member base_guard"
    # 8 training queries < 10: every query folds into its own domain's pilot, one pilot per domain
    assert sorted(zip(pilots.domains, pilots.experts)) == [("nfcorpus", "nfcorpus"), ("scifact", "scifact")]
    # `up` (train_default_experts) trains nothing here but brings the pilots back to the config's rule
    cfg.experts.training.default_domains = ["scifact", "nfcorpus"]
    assert train_default_experts(cfg, data_dir, progress=False) == []
    assert load_pilots(cfg).rule == pilot_rule(cfg)
    # a file from before the pilots kept their members: stale too (pilot_knn routes by them); the
    # evaluation refuses it, and `up` rebuilds it
    from actors.routing import PilotSet
    from serve.artifacts.experts import pilots_follow_config, pilots_path, publish_draft

    old = load_pilots(cfg)
    bare = PilotSet(old.embeddings, old.experts, old.domains, old.base_model, old.rule, old.floors, old.guards)
    bare.save(pilots_path(cfg))
    assert not pilots_follow_config(load_pilots(cfg), cfg)
    publish_draft(cfg, "pilots from before members")
    with pytest.raises(ValueError, match="pilot_knn routes by the pilots' members"):
        evaluate(cfg, data_dir, ["scifact"], ["pilot_knn"], max_queries=2, progress=False)
    assert train_default_experts(cfg, data_dir, progress=False) == []
    assert load_pilots(cfg).members.shape[0] == load_pilots(cfg).member_pilot.shape[0] > 0


def test_add_external_adapter_builds_only_its_domains_pilots(cfg, data_dir, random_adapters, tmp_path):
    train_domain_expert(cfg, data_dir, "scifact", progress=False)
    scifact_adapter = _folder_hash(enabled_experts(cfg)["scifact"])
    scifact_pilots = load_pilots(cfg).embeddings.copy()
    wins = add_expert(cfg, data_dir, "nf-ext", random_adapters["alpha"], domain="nfcorpus", progress=False)
    assert sum(wins.values()) == 8 and set(wins) <= {"scifact", "nf-ext"}  # every training query won by someone
    assert sorted(enabled_experts(cfg)) == ["nf-ext", "scifact"]
    assert _folder_hash(enabled_experts(cfg)["nf-ext"]) == _folder_hash(random_adapters["alpha"])
    assert _folder_hash(enabled_experts(cfg)["scifact"]) == scifact_adapter
    pilots = load_pilots(cfg)
    np.testing.assert_array_equal(pilots.embeddings[[i for i, d in enumerate(pilots.domains) if d == "scifact"]], scifact_pilots)
    assert sorted(e for e, d in zip(pilots.experts, pilots.domains) if d == "nfcorpus") == sorted(wins)
    # a second add of the same name needs replace=True; replacing swaps the weights in place
    with pytest.raises(FileExistsError, match="nf-ext"):
        add_expert(cfg, data_dir, "nf-ext", random_adapters["beta"], domain="nfcorpus", progress=False)
    add_expert(cfg, data_dir, "nf-ext", random_adapters["beta"], domain="nfcorpus", replace=True, progress=False)
    assert _folder_hash(enabled_experts(cfg)["nf-ext"]) == _folder_hash(random_adapters["beta"])
    assert not [p for p in (tmp_path / "experts" / "adapters").iterdir() if p.name.startswith(".")]


def test_add_rejects_bad_names_and_adapters_before_writing(cfg, data_dir, random_adapters, tmp_path):
    import shutil

    for bad in ["", "base", "a:b", "../x", "x" * 65]:
        with pytest.raises(ValueError, match="invalid expert name"):
            add_expert(cfg, data_dir, bad, random_adapters["alpha"], domain="scifact", progress=False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        add_expert(cfg, data_dir, "x", tmp_path, domain="scifact", progress=False)
    wrong = tmp_path / "wrong"
    shutil.copytree(random_adapters["alpha"], wrong)
    conf = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**conf, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type"):
        add_expert(cfg, data_dir, "x", wrong, domain="scifact", progress=False)
    (wrong / "adapter_config.json").write_text(json.dumps({**conf, "target_modules": ["no_such_proj"]}))
    with pytest.raises(ValueError, match="does not load onto base model"):
        add_expert(cfg, data_dir, "x", wrong, domain="scifact", progress=False)
    with pytest.raises(ValueError, match="no-such-domain"):
        add_expert(cfg, data_dir, "x", random_adapters["alpha"], domain="no-such-domain", progress=False)
    assert enabled_experts(cfg) == {} and load_pilots(cfg) is None
    assert generation_store(cfg).list() == []  # nothing published either


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


def test_domain_pilots_group_queries_by_their_best_expert(engine, data_dir):
    """Independent recomputation: rank with numpy, binary nDCG@10 by hand, group, average."""
    from actors.beir import iter_corpus
    from serve.offline.ir import qualify
    from serve.offline.indexing import Corpus
    from serve.offline.pilots import domain_pilots

    docs = list(iter_corpus(data_dir, "scifact", 80))
    vecs = engine.encode([d.as_passage() for d in docs])
    corpus = Corpus("scifact", [d.doc_id for d in docs], ["scifact"] * len(docs), vecs)
    texts = [d.title for d in docs[:12]]  # each title's own abstract is its relevant doc
    qids = [f"q{i}" for i in range(12)]
    qrels = {q: {qualify("scifact", docs[i].doc_id): 1} for i, q in enumerate(qids)}
    pilots, wins = domain_pilots(engine, "scifact", qids, texts, qrels, corpus, "m")

    def ndcg(expert):
        order = np.argsort(-(engine.encode(texts, expert) @ vecs.T), axis=1)[:, :10]
        return np.array([1 / np.log2(2 + list(order[i]).index(i)) if i in order[i] else 0.0 for i in range(12)])

    table = np.stack([ndcg("alpha"), ndcg("beta")], axis=1)
    best = [0 if row[0] == row.max() else 1 for row in table]  # no own expert: ties → first
    base = engine.encode(texts)
    assert sum(wins.values()) == 12 and set(pilots.domains) == {"scifact"}
    for name, j in (("alpha", 0), ("beta", 1)):
        members = [i for i in range(12) if best[i] == j]
        assert wins.get(name, 0) == len(members)
        if members:
            row = pilots.experts.index(name)
            np.testing.assert_allclose(pilots.embeddings[row], base[members].mean(axis=0), atol=1e-5)
            # the group's queries are kept as the pilot's members, in the queries' order
            assert np.flatnonzero(pilots.member_pilot == row).tolist() == members
    np.testing.assert_allclose(pilots.members, base, atol=1e-6)


def test_best_experts_margin_and_minimum_group_size():
    from serve.offline.pilots import best_experts

    table = np.array([
        [0.50, 0.50, 0.10],  # tie with the own expert (0): own
        [0.40, 0.45, 0.00],  # expert 1 better by 0.05
        [0.10, 0.60, 0.00],  # expert 1 better by 0.50
        [0.00, 0.00, 0.30],  # expert 2 better by 0.30, alone in its group
    ])
    assert best_experts(table, own=0).tolist() == [0, 1, 1, 2]  # the paper's rule
    assert best_experts(table, own=0, margin=0.1).tolist() == [0, 0, 1, 2]
    assert best_experts(table, own=0, margin=0.1, min_queries=2).tolist() == [0, 0, 0, 0]  # both groups of 1 fold
    assert best_experts(table, own=0, min_queries=2).tolist() == [0, 1, 1, 0]
    assert best_experts(table, own=0, margin=1.0).tolist() == [0, 0, 0, 0]  # one pilot per domain


def test_best_experts_ties_between_other_experts_do_not_depend_on_load_order():
    from serve.offline.pilots import best_experts

    # own expert "arguana" (column 1) misses; "scifact" and "cranfield" tie on every query
    table = np.array([[1.0, 0.0, 1.0], [1.0, 0.2, 1.0], [0.9, 0.0, 0.9]])
    names = ["scifact", "arguana", "cranfield"]
    assert best_experts(table, own=1).tolist() == [0, 0, 0]  # no names: first column
    assert best_experts(table, own=1, names=names).tolist() == [2, 2, 2]  # cranfield < scifact
    # the same experts loaded in another order choose the same expert (by name)
    perm = [2, 0, 1]  # cranfield, scifact, arguana
    got = best_experts(table[:, perm], own=2, names=[names[i] for i in perm], margin=0.5, min_queries=2)
    assert [[names[i] for i in perm][j] for j in got] == ["cranfield"] * 3


def test_mined_objective_uses_hard_negatives_from_the_base_index(cfg, data_dir):
    cfg.experts.training.objective = "mined"
    report = train_domain_expert(cfg, data_dir, "scifact", progress=False)
    assert report["objective"] == "in_batch+mined" and report["hard_negatives_per_query"] == 2
    assert load_pilots(cfg).domains == ["scifact"]


def test_split_dev_is_deterministic_disjoint_and_skipped_when_small():
    from serve.offline.ir import split_dev

    examples = [(f"q{i}", "t", 0, {0}) for i in range(200)]
    train, dev = split_dev(examples, 0.1)
    assert len(dev) == 20 and len(train) == 180 and not {e[0] for e in dev} & {e[0] for e in train}
    assert split_dev(list(reversed(examples)), 0.1)[1] == sorted(dev, key=lambda e: -int(e[0][1:]))
    small_train, small_dev = split_dev(examples[:50], 0.1)  # 10 % is 5: raised to the minimum of 10
    assert len(small_dev) == 10 and len(small_train) == 40
    assert split_dev(examples[:29], 0.1) == (examples[:29], [])  # under 3 × 10 queries: no dev
    assert split_dev(examples, 0.0) == (examples, [])


def test_adapter_settings_scale_steps_and_patience_and_drop_patience_without_dev():
    train = config_from_dict({"experts": {"training": {"steps": 600, "patience": 150, "rank": 4}}}).experts.training
    one = adapter_settings(train)
    assert (one.steps, one.patience, one.rank) == (600, 150, 4)
    multi = adapter_settings(train, step_scale=5)
    assert (multi.steps, multi.patience) == (3000, 750)
    assert adapter_settings(train, has_dev=False).patience is None
    assert adapter_settings(config_from_dict({}).experts.training).patience is None


@pytest.fixture
def plain_cfg(tmp_path):
    """A config for tests that never reach Ray (they fail before, or mock the corpus)."""
    return config_from_dict({"model": {"max_seq_length": 64}, "index": {"dir": str(tmp_path / "index")},
                             "experts": {"dir": str(tmp_path / "experts"), "training": {"steps": 2, "max_queries": 8}}})


def test_remove_never_leaves_the_expert_store(plain_cfg, tmp_path):
    root = tmp_path / "experts" / "adapters"
    (root / "keep").mkdir(parents=True)
    (root / "keep" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    for bad in ["..", "../precious", str(outside), "keep/../..", "base", ""]:
        with pytest.raises(ValueError, match="invalid expert name"):
            remove_expert(plain_cfg, bad)
    (root / "evil").symlink_to(outside, target_is_directory=True)
    remove_expert(plain_cfg, "evil", publish=False)  # the link goes, never what it points to
    assert not (root / "evil").exists() and (outside / "adapter_config.json").is_file()
    assert sorted(os.listdir(root)) == ["keep"] and sorted(os.listdir(tmp_path / "experts")) == ["adapters"]


def test_domain_names_cannot_leave_the_data_dir(plain_cfg, data_dir):
    from actors.beir import DatasetError, load_queries

    for bad in ["..", "../shared", "/etc", "scifact/../../x"]:
        with pytest.raises(DatasetError, match="invalid dataset name"):
            load_queries(data_dir, bad)
        with pytest.raises(ValueError):
            train_domain_expert(plain_cfg, data_dir, bad, progress=False)


def test_a_training_crash_leaves_the_old_adapter(plain_cfg, data_dir, random_adapters, monkeypatch):
    """Training writes into a staging folder: killed mid-save, the expert on disk is the old one
    and no half-written folder is ever listed as an expert."""
    import shutil

    from actors.beir import iter_corpus
    from serve.offline import training
    from serve.offline.indexing import Corpus

    root = plain_cfg.experts.dir / "adapters"
    shutil.copytree(random_adapters["alpha"], root / "scifact")
    before = _folder_hash(root / "scifact")
    docs = list(iter_corpus(data_dir, "scifact"))
    vectors = np.random.default_rng(0).normal(size=(len(docs), 384)).astype(np.float32)
    monkeypatch.setattr(training, "load_corpus_vectors",
                        lambda *a, **k: Corpus("scifact", [d.doc_id for d in docs], ["scifact"] * len(docs), vectors))

    def dies_while_saving(model_path, settings, texts, positives, out_dir, *a, **k):
        (out_dir / "adapter_config.json").write_text("{}")
        (out_dir / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # truncated weights
        assert enabled_experts(plain_cfg) == {"scifact": root / "scifact"}  # never listed meanwhile
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(training, "train_query_adapter", dies_while_saving)
    with pytest.raises(KeyboardInterrupt):
        train_domain_expert(plain_cfg, data_dir, "scifact", progress=False)
    assert _folder_hash(root / "scifact") == before and sorted(os.listdir(root)) == ["scifact"]


def test_a_failed_replace_keeps_the_old_adapter(plain_cfg, data_dir, random_adapters, monkeypatch):
    import shutil

    from serve.offline import training

    add_root = plain_cfg.experts.dir / "adapters"
    shutil.copytree(random_adapters["alpha"], add_root / "nf-ext")
    before = _folder_hash(add_root / "nf-ext")
    real = shutil.copytree

    def copy_then_die(src, dst, **kw):
        real(src, dst, **kw)
        (dst / "adapter_model.safetensors").write_bytes(b"\0")
        raise OSError("no space left on device")

    monkeypatch.setattr(training.shutil, "copytree", copy_then_die)
    with pytest.raises(OSError, match="no space"):
        add_expert(plain_cfg, data_dir, "nf-ext", random_adapters["beta"], domain="nfcorpus", replace=True, progress=False)
    assert _folder_hash(add_root / "nf-ext") == before and sorted(os.listdir(add_root)) == ["nf-ext"]


def test_union_rows_of_a_domain_are_its_own_rows_shifted():
    from serve.offline.indexing import Corpus
    from serve.offline.ir import shift_rows, union_offset

    rng = np.random.default_rng(0)
    a = Corpus("a", ["1", "2", "3"], ["a"] * 3, rng.standard_normal((3, 4)).astype(np.float32))
    b = Corpus("b", ["1", "2"], ["b"] * 2, rng.standard_normal((2, 4)).astype(np.float32))  # ids repeat across datasets
    union = Corpus("a+b", a.doc_ids + b.doc_ids, a.datasets + b.datasets, np.concatenate([a.vectors, b.vectors]))
    assert union_offset(union, "a", a) == 0 and union_offset(union, "b", b) == 3
    examples = [("q1", "text", 1, {0, 1})]
    shifted = shift_rows(examples, 3)
    assert shifted == [("q1", "text", 4, {3, 4})]
    assert [union.doc_ids[r] for r in sorted(shifted[0][3])] == [b.doc_ids[r] for r in sorted(examples[0][3])]
    with pytest.raises(ValueError, match="not in the union"):
        union_offset(union, "c", b)
    stale = Corpus("b", ["1", "9"], ["b"] * 2, b.vectors)
    with pytest.raises(ValueError, match="not its own corpus's rows"):
        union_offset(union, "b", stale)


def test_an_expert_trained_against_the_union_sees_every_served_corpus(cfg, data_dir):
    """experts.training.negatives: union — the full-corpus softmax and the dev selection run over
    the served index's corpora (corpus.datasets + the domain), as the expert is searched when served."""
    cfg = cfg.model_copy(deep=True)
    cfg.corpus.datasets = ["scifact", "nfcorpus"]
    cfg.experts.training.negatives = "union"
    cfg.experts.training.objective = "full_corpus"
    report = train_domain_expert(cfg, data_dir, "nfcorpus", progress=False, pilots=False)
    saved = json.loads((adapters_root(cfg) / "nfcorpus" / "train_report.json").read_text())
    assert report["corpus_size"] == 600 and saved["negatives"] == "union"  # 300 + 300: both corpora
    assert saved["negatives_datasets"] == ["nfcorpus", "scifact"] and saved["preserve_datasets"] == []
    assert saved["preserve"] == {"texts": 0, "weight": 0.0, "encoded": 0} and saved["preserve_words"] is None
    cfg.experts.training.negatives = "domain"
    cfg.experts.training.preserve_weight, cfg.experts.training.preserve_texts = 1.0, 8  # leave scifact's passages alone
    own = train_domain_expert(cfg, data_dir, "nfcorpus", progress=False, pilots=False)
    saved = json.loads((adapters_root(cfg) / "nfcorpus" / "train_report.json").read_text())
    assert own["corpus_size"] == 300 and saved["preserve"]["texts"] == 8 and saved["preserve"]["weight"] == 1.0
    assert 1 <= saved["preserve"]["encoded"] <= 8
    assert saved["preserve_datasets"] == ["scifact"] and saved["preserve_words"] == cfg.experts.training.preserve_words == 12


def test_an_expert_trained_against_both_keeps_its_own_corpus_in_the_loss_and_the_dev(cfg, data_dir):
    """experts.training.negatives: both — the union's softmax and the domain's own, the dev step
    chosen on the mean of the dev nDCG@10 in the union and in the own corpus (both recorded)."""
    cfg = cfg.model_copy(deep=True)
    cfg.corpus.datasets = ["scifact", "nfcorpus"]
    cfg.experts.training.negatives = "both"
    cfg.experts.training.objective = "full_corpus"
    cfg.experts.training.max_queries, cfg.experts.training.eval_every = 40, 2  # 30+ queries: 10 held out for dev
    report = train_domain_expert(cfg, data_dir, "nfcorpus", progress=False, pilots=False)
    saved = json.loads((adapters_root(cfg) / "nfcorpus" / "train_report.json").read_text())
    assert report["corpus_size"] == 600 and report["own_domain_softmax"] and saved["negatives"] == "both"
    by_setting = saved["dev_curve_by_setting"]
    assert sorted(by_setting) == ["domain", "union"] and len(by_setting["union"]) == len(saved["dev_curve"]) > 1
    for (_, score), union, own in zip(saved["dev_curve"], by_setting["union"], by_setting["domain"]):
        assert score == pytest.approx((union + own) / 2)
    assert by_setting["domain"][0] >= by_setting["union"][0]  # at step 0 (base): more distractors in the union
    assert report["num_dev_queries"] == 2 * len(saved["dev_query_ids"])  # each dev query, once per setting


def test_negatives_both_needs_the_full_corpus_objective():
    from pydantic import ValidationError

    from serve.config import ExpertTrainConfig

    with pytest.raises(ValidationError, match="negatives 'both' needs experts.training.objective 'full_corpus'"):
        ExpertTrainConfig(negatives="both", objective="mined")


def test_the_multitask_adapter_trained_against_the_union_sees_every_served_corpus(cfg, data_dir):
    """The multi-task baseline under negatives: union gets what the experts get: the served
    index's corpora (corpus.datasets + its domains) in its softmax, not only its domains'."""
    from serve.artifacts.experts import multitask_dir
    from serve.offline.training import train_multitask_expert

    cfg = cfg.model_copy(deep=True)
    cfg.corpus.datasets = ["scifact", "nfcorpus", "cranfield"]
    cfg.experts.training.objective = "full_corpus"
    cfg.experts.training.negatives = "union"
    cfg.experts.training.max_queries, cfg.experts.training.eval_every = 40, 2  # 30+ queries: dev queries held out
    report = train_multitask_expert(cfg, data_dir, ["scifact", "nfcorpus"], progress=False)
    saved = json.loads((multitask_dir(cfg) / "train_report.json").read_text())
    assert report["corpus_size"] == 900 and saved["negatives_datasets"] == ["cranfield", "nfcorpus", "scifact"]
    cfg.experts.training.negatives = "both"
    both = train_multitask_expert(cfg, data_dir, ["scifact", "nfcorpus"], progress=False)
    assert both["corpus_size"] == 900 and both["own_domain_softmax"] and not report["own_domain_softmax"]
    assert both["num_dev_queries"] == 2 * report["num_dev_queries"] > 0  # each domain's dev in the union and its own corpus
    cfg.experts.training.negatives = "domain"
    own = train_multitask_expert(cfg, data_dir, ["scifact", "nfcorpus"], progress=False)
    assert own["corpus_size"] == 600  # its two domains side by side


def test_pilots_carry_confidence_floors_and_the_base_guard_judged_in_the_served_index(cfg, data_dir, model_path, tmp_path):
    """Pilot building records each domain's floor and its owner expert's base guard, scored on
    the served index (corpus.datasets). An adapter that IS the base model (LoRA B = 0) does not
    beat base — not routed to, in the pilot file, the generation and `/v1/experts`' source; with
    experts.base_guard off nothing is judged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from actors.routing import get_policy, route

    same = tmp_path / "same-as-base"
    get_peft_model(AutoModel.from_pretrained(str(model_path)),
                   LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])).save_pretrained(str(same))
    cfg = cfg.model_copy(deep=True)
    cfg.corpus.datasets = ["scifact", "nfcorpus"]
    add_expert(cfg, data_dir, "nf-same", same, domain="nfcorpus", progress=False)
    pilots = generation_store(cfg).current().load_pilots()
    guard = pilots.guards["nf-same"]
    assert guard["domain"] == "nfcorpus" and guard["index"] == ["nfcorpus", "scifact"]
    assert guard["queries"] == "training" and guard["num_queries"] == 8  # 8 < 30 queries: no dev split
    assert guard["expert_ndcg10"] == pytest.approx(guard["base_ndcg10"], abs=1e-6) and guard["routed"] is False
    assert pilots.unrouted == {"nf-same"} and not np.isnan(pilots.floors).any()
    # the domain's own training queries are routed, within the floor, and then held back to base
    examples = training_queries(data_dir, "nfcorpus", 8)
    from actors.encoder import EncoderEngine
    from serve.artifacts.models import encoder_settings, resolve_model

    base = EncoderEngine(resolve_model(cfg.model.ref), None, encoder_settings(cfg)).encode([t for _, t, _ in examples])
    assert route(base, pilots, get_policy("pilot_mean"))[0] == ["base"] * len(examples)
    assert route(base, pilots, get_policy("pilot_mean"), gate=False)[0] == ["nf-same"] * len(examples)
    # the config's floor (experts.confidence_floor member): the 0.1 quantile of each training query's
    # cosine to its nearest OTHER training query of the domain
    from actors.routing import domain_floor, member_floor

    nf = [i for i, d in enumerate(pilots.domains) if d == "nfcorpus"]
    members = pilots.members[np.isin(pilots.member_pilot, nf)]  # the training queries the pilots were built from
    assert pilots.floor_kind == "member" and pilots.floors[nf] == pytest.approx(member_floor(members, 0.1), abs=1e-5)
    # a full rebuild (another rule) keeps judging nf-same as nfcorpus's own expert: the guard says so
    from serve.offline.pilots import build_pilots

    cfg.experts.confidence_quantile, cfg.experts.confidence_floor = 0.5, "pilot"
    build_pilots(cfg, data_dir, progress=False)
    assert load_pilots(cfg).guards["nf-same"]["domain"] == "nfcorpus" and load_pilots(cfg).unrouted == {"nf-same"}
    rebuilt = load_pilots(cfg)  # the pilot floor: to the nearest own pilot, at 0.5
    nf = [i for i, d in enumerate(rebuilt.domains) if d == "nfcorpus"]
    assert rebuilt.floor_kind == "pilot" and "confidence_floor" not in rebuilt.rule
    members = rebuilt.members[np.isin(rebuilt.member_pilot, nf)]
    assert rebuilt.floors[nf] == pytest.approx(domain_floor(members, rebuilt.embeddings[nf], 0.5), abs=1e-5)
    # the served index changes: the guard was judged elsewhere, so the pilots no longer follow the config
    from serve.artifacts.experts import pilots_follow_config, stale_guards

    cfg.corpus.datasets = ["nfcorpus"]
    assert stale_guards(load_pilots(cfg), cfg) == ["nf-same"] and not pilots_follow_config(load_pilots(cfg), cfg)
    build_pilots(cfg, data_dir, ["nfcorpus"], progress=False)
    assert load_pilots(cfg).guards["nf-same"]["index"] == ["nfcorpus"] and pilots_follow_config(load_pilots(cfg), cfg)
    cfg.experts.base_guard = False
    add_expert(cfg, data_dir, "nf-same", same, domain="nfcorpus", replace=True, progress=False)
    assert load_pilots(cfg).guards == {} and load_pilots(cfg).unrouted == set()


def test_preserve_passages_come_evenly_from_the_other_served_corpora(plain_cfg, data_dir):
    from actors.beir import iter_corpus
    from serve.offline.training import preserve_datasets, preserve_passages

    cfg = plain_cfg.model_copy(deep=True)
    cfg.corpus.datasets = ["scifact", "nfcorpus", "arguana"]
    assert preserve_passages(cfg, data_dir, "nfcorpus") == [] and preserve_datasets(cfg, "nfcorpus") == []  # weight 0: off
    cfg.experts.training.preserve_weight, cfg.experts.training.preserve_texts = 10.0, 9
    assert preserve_datasets(cfg, "nfcorpus") == ["scifact", "arguana"]
    got = preserve_passages(cfg, data_dir, "nfcorpus")
    words = cfg.experts.training.preserve_words
    cut = {d: {" ".join(doc.as_passage().split()[:words]) for doc in iter_corpus(data_dir, d)}
           for d in ["scifact", "nfcorpus", "arguana"]}
    assert len(got) == 9 and len(set(got)) == 9 and got == preserve_passages(cfg, data_dir, "nfcorpus")
    assert sum(p in cut["scifact"] for p in got) == 4 and sum(p in cut["arguana"] for p in got) == 5
    assert not any(p in cut["nfcorpus"] for p in got) and all(len(p.split()) <= words for p in got)
    assert max(len(p.split()) for p in got) == words  # some passage is longer than the cut: it was cut
    cfg.experts.training.preserve_words = 6  # query-length texts: the same passages' first six words
    short = preserve_passages(cfg, data_dir, "nfcorpus")
    assert short == [" ".join(p.split()[:6]) for p in got]
    cfg.corpus.datasets = ["nfcorpus"]  # a domain served alone has nothing to leave alone
    assert preserve_passages(cfg, data_dir, "nfcorpus") == []
