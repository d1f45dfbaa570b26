"""Evaluation: real encoders, real ir-measures, small capped corpora (Ray Data builds the index)."""

import numpy as np
import pytest

from serve.config import config_from_dict
from serve.offline.beir_eval import evaluate, write_report
from serve.offline.indexing import Corpus
from serve.offline.ir import per_query, search_run


@pytest.fixture(scope="module")
def eval_result(tmp_path_factory, data_dir, ray_session):
    from serve.offline.beir_eval import DEFAULT_POLICIES
    from serve.offline.training import train_domain_expert, train_multitask_expert

    root = tmp_path_factory.mktemp("eval")
    cfg = config_from_dict(
        {
            "model": {"max_seq_length": 96},
            "corpus": {"datasets": ["scifact", "nfcorpus"], "max_docs_per_dataset": 300},  # the served index
            "index": {"dir": str(root / "index"), "encode_workers": 1, "chunk_size": 128},
            "experts": {
                "dir": str(root / "experts"),
                "training": {"steps": 3, "max_queries": 30, "batch_size": 8, "dev_fraction": 0.34, "eval_every": 2},
            },
        }
    )
    for domain in ("scifact", "nfcorpus"):
        train_domain_expert(cfg, data_dir, domain, progress=False)
    train_multitask_expert(cfg, data_dir, ["scifact", "nfcorpus"], progress=False)
    per_domain = evaluate(
        cfg, data_dir, ["scifact", "nfcorpus"], [*DEFAULT_POLICIES, "multitask"], max_queries=25, progress=False
    )
    union = evaluate(cfg, data_dir, ["scifact", "nfcorpus"], ["base", "pilot_mean", "pilot_mean_ungated"], "union",
                     max_queries=25, progress=False)
    lodo = evaluate(cfg, data_dir, ["scifact", "nfcorpus"], ["base", "pilot_mean", "pilot_mean_ungated", "dataset_router",
                                                             "dataset_oracle"], "lodo", max_queries=25, progress=False)
    with pytest.raises(ValueError, match="classifier"):
        evaluate(cfg, data_dir, ["scifact"], ["classifier"], "lodo", max_queries=2, progress=False)
    return {"per_domain": per_domain, "union": union, "lodo": lodo, "root": root}


def test_result_shape_and_ranges(eval_result):
    r = eval_result["per_domain"]
    assert set(r["policies"]) == {"base", "pilot_mean", "pilot_knn", "pilot_nearest", "dataset_router", "classifier", "multitask",
                                  "dataset_oracle", "instance_oracle"}
    for per in [*r["policies"].values(), *r["recall@100"].values()]:
        assert set(per) == {"scifact", "nfcorpus", "avg"}
        assert all(0.0 <= v <= 1.0 for v in per.values())
        assert per["avg"] == pytest.approx((per["scifact"] + per["nfcorpus"]) / 2)
    assert r["experts"] == ["scifact", "nfcorpus"] and all(n > 0 for n in r["num_queries"].values())
    assert r["policies"]["base"]["avg"] > 0.05  # real retrieval, not noise
    assert "multitask" in r["policies"] and r["routing"]["multitask"]["scifact"] == {"multitask": r["num_queries"]["scifact"]}
    assert set(r["routing"]["classifier"]["scifact"]) <= {"scifact", "nfcorpus"}
    import json

    mt = json.loads((eval_result["root"] / "experts" / "multitask" / "train_report.json").read_text())
    assert mt["num_dev_queries"] >= 20 and [s for s, _ in mt["dev_curve"]] == [0, 2, 4, 6]


def test_oracles_bound_the_other_policies(eval_result):
    p = eval_result["per_domain"]["policies"]
    for d in ("scifact", "nfcorpus"):
        for other in ("base", "pilot_mean", "pilot_knn", "pilot_nearest", "dataset_router", "classifier", "dataset_oracle"):
            assert p["instance_oracle"][d] >= p[other][d] - 1e-9
        for single in ("base", "dataset_router"):
            assert p["dataset_oracle"][d] >= p[single][d] - 1e-9


def test_routing_confusion_counts_every_query(eval_result):
    r = eval_result["per_domain"]
    for policy, rows in r["routing"].items():
        for d, row in rows.items():
            assert sum(row.values()) == r["num_queries"][d]
    assert r["routing"]["dataset_router"]["scifact"] == {"scifact": r["num_queries"]["scifact"]}
    assert r["routing"]["base"]["nfcorpus"] == {"base": r["num_queries"]["nfcorpus"]}


def test_union_setting_runs_over_one_index(eval_result):
    u = eval_result["union"]
    assert u["setting"] == "union" and set(u["policies"]) == {"base", "pilot_mean", "pilot_mean_ungated"}
    # a bigger corpus can only push relevant docs down: union base <= per-domain base (+ float noise)
    assert u["policies"]["base"]["avg"] <= eval_result["per_domain"]["policies"]["base"]["avg"] + 1e-9


def test_the_served_rule_keeps_guarded_experts_out_and_the_bare_rule_does_not(eval_result):
    """pilot_mean is routed as served (floor + base guard, recorded in the result); the ungated
    variant is the bare policy: it never sends a query to base while experts exist."""
    u = eval_result["union"]
    assert set(u["guards"]) == {"scifact", "nfcorpus"} and u["pilot_rule"]["base_guard"] is True
    for expert, guard in u["guards"].items():
        assert guard["index"] == ["nfcorpus", "scifact"] and guard["queries"] == "dev"  # corpus.datasets
        assert guard["routed"] == (guard["expert_ndcg10"] > guard["base_ndcg10"])
        if not guard["routed"]:
            assert all(expert not in row for row in u["routing"]["pilot_mean"].values())
    assert all("base" not in row for row in u["routing"]["pilot_mean_ungated"].values())


def test_leave_one_domain_out_routes_without_the_domains_expert(eval_result):
    r = eval_result["lodo"]
    assert r["setting"] == "lodo" and r["experts"] == ["scifact", "nfcorpus"]
    for domain, other in (("scifact", "nfcorpus"), ("nfcorpus", "scifact")):
        for policy, rows in r["routing"].items():
            assert domain not in rows[domain], (policy, rows[domain])  # its own expert does not exist here
            assert sum(rows[domain].values()) == r["num_queries"][domain]
        assert r["routing"]["dataset_router"][domain] == {"base": r["num_queries"][domain]}
        assert r["routing"]["pilot_mean_ungated"][domain] == {other: r["num_queries"][domain]}  # the only expert left
        assert set(r["routing"]["pilot_mean"][domain]) <= {"base", other}
        # the oracle chooses between base and the other expert only
        assert r["policies"]["dataset_oracle"][domain] == pytest.approx(
            max(r["policies"]["base"][domain], r["policies"]["pilot_mean_ungated"][domain]))
    # the union's figures for base are the same queries in the same index
    assert r["policies"]["base"] == pytest.approx(eval_result["union"]["policies"]["base"])
    assert r["unknown_corpus_share"] == 0.8  # the served corpus guard (its effect: the test below)


def test_per_query_scores_are_kept_in_query_order_and_average_to_the_figures(eval_result):
    """The per-query nDCG@10 behind every figure (what a paired interval needs) is in the result."""
    for setting in ("per_domain", "union", "lodo"):
        r = eval_result[setting]
        for policy, per in r["per_query_ndcg@10"].items():
            for d in r["domains"]:
                assert len(per[d]) == len(r["query_ids"][d]) == r["num_queries"][d]
                assert np.mean(per[d]) == pytest.approx(r["policies"][policy][d], abs=1e-5)
    r = eval_result["per_domain"]
    assert r["query_ids"]["scifact"] == sorted(r["query_ids"]["scifact"])
    best = np.maximum.reduce([np.array(v["scifact"]) for k, v in r["per_query_ndcg@10"].items() if k != "multitask"])
    assert np.allclose(r["per_query_ndcg@10"]["instance_oracle"]["scifact"], best)  # per query: the oracle's pick


def test_report_files(eval_result, tmp_path):
    eval_result["per_domain"]["command"] = "routerserve eval beir (test)"
    paths = write_report(eval_result["per_domain"], tmp_path / "beir")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
    md = paths[1].read_text()
    assert "| pilot_mean |" in md and "instance_oracle" in md
    assert eval_result["per_domain"]["pilot_rule"]["confidence_floor"] == "member"  # the config's default floor, named
    assert "0.1 quantile of its training queries' cosine to their nearest other training query" in md
    from serve.offline.significance import macro_interval, paired

    r = eval_result["per_domain"]
    iv = macro_interval(paired("pilot_mean", "base", r["per_query_ndcg@10"], r["domains"]))
    row = next(line for line in md.splitlines() if line.startswith("| pilot_mean |"))
    assert row.endswith(f"| {100 * iv.mean:+.2f} [{100 * iv.low:+.2f}, {100 * iv.high:+.2f}] |")  # Δ avg vs base
    assert next(line for line in md.splitlines() if line.startswith("| base |")).endswith("| – |")
    old = {k: v for k, v in r.items() if k not in ("per_query_ndcg@10", "query_ids")}  # a result from before them
    assert "Δ avg" not in write_report(old, tmp_path / "old")[1].read_text()
    assert not list(tmp_path.glob("*.tmp"))  # written through temporary files, none left behind
    assert "Corpus guard" not in md  # per domain every corpus has its expert: nothing to say
    lodo = write_report({**eval_result["lodo"], "command": "x"}, tmp_path / "lodo")[1].read_text()
    assert "Corpus guard: the held-out domain's corpus has no expert" in lodo and "at least 0.8 from it" in lodo


def test_self_retrieval_is_dropped_and_metrics_match_hand_computation():
    vecs = np.eye(4, dtype=np.float32)
    corpus = Corpus("toy", ["q1", "d1", "d2", "d3"], ["toy"] * 4, vecs)
    q = np.array([[1.0, 0.9, 0.1, 0.0]], dtype=np.float32)
    kept = search_run(q, ["q1"], corpus, 3, drop_self=False, domain="toy")["q1"]
    dropped = search_run(q, ["q1"], corpus, 3, drop_self=True, domain="toy")["q1"]
    assert list(kept) == ["toy/q1", "toy/d1", "toy/d2"] and list(dropped) == ["toy/d1", "toy/d2", "toy/d3"]
    # the same id in ANOTHER dataset is not the query itself: it stays
    other = Corpus("mix", ["q1", "d1"], ["other", "toy"], np.eye(2, 4, dtype=np.float32))
    assert "other/q1" in search_run(q, ["q1"], other, 2, drop_self=True, domain="toy")["q1"]
    from ir_measures import nDCG

    qrels = {"q1": {"toy/d2": 1}}
    # d2 at rank 2 → nDCG@10 = 1/log2(3)
    assert per_query(qrels, {"q1": dropped}, nDCG @ 10)["q1"] == pytest.approx(1 / np.log2(3))


def test_unknown_policy_is_rejected(tmp_path, data_dir):
    with pytest.raises(ValueError, match="unknown policies"):
        evaluate(config_from_dict({"experts": {"dir": str(tmp_path)}}), data_dir, ["scifact"], ["psychic"])


def test_gated_pilot_policies_apply_the_corpus_guard_as_the_service_does():
    """lodo: the held-out domain's corpus has no expert; a query whose base top 10 come mostly from
    it goes to base under the served rule, not under the paper's bare rule (and not with the guard off)."""
    from dataclasses import replace

    from actors.encoder import BASE
    from actors.routing import PilotSet
    from serve.offline.beir_eval import DomainRun, _EVAL_POLICIES

    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2]], np.float32)
    run = DomainRun("scifact", ["q1", "q2", "q3"], {BASE: emb}, {}, pilots=PilotSet(np.array([[1.0, 0.0]], np.float32),
                    ["nfcorpus"], ["nfcorpus"]), experts=["nfcorpus"],
                    base_hit_corpora=[["scifact"] * 9 + ["nfcorpus"], ["scifact"] * 7 + ["nfcorpus"] * 3, ["nfcorpus"] * 10],
                    unknown_corpora=["scifact"], unknown_corpus_share=0.8)
    assert _EVAL_POLICIES["pilot_mean"](run) == [BASE, "nfcorpus", "nfcorpus"]
    assert _EVAL_POLICIES["pilot_knn"](run) == [BASE, "nfcorpus", "nfcorpus"]
    assert _EVAL_POLICIES["pilot_mean_ungated"](run) == ["nfcorpus"] * 3
    assert _EVAL_POLICIES["pilot_mean"](replace(run, unknown_corpus_share=None)) == ["nfcorpus"] * 3
    assert _EVAL_POLICIES["pilot_mean"](replace(run, unknown_corpora=[])) == ["nfcorpus"] * 3  # every corpus has an expert
