"""`routerserve k8s render`: the Kubernetes objects, from the same config as the local run.

One config, three outputs: the local run reads ``configs/local.yaml`` as is; the Serve config and
the KubeRay RayService are rendered from it with ``k8s.overrides`` applied (the dotted keys that
differ on the cluster: GPUs, autoscaling, engine settings) and the artifact paths moved under the
mount path. What is written to ``k8s/``:

* ``rayservice.yaml``   — RayService: head (no replicas: ``num-cpus: "0"``), a CPU worker group
  (ingress, shard searchers, controller) and a GPU worker group (expert encoder, vLLM engines),
  in-tree autoscaler v2, ``serveConfigV2`` embedded as a string;
* ``serve-config.yaml`` — the same Serve config as a file (``serve deploy`` on any Ray cluster);
* ``artifacts-pvc.yaml`` — the claim holding index/, experts/, models/, data/ (volume mode);
* ``podmonitor.yaml``   — Prometheus operator PodMonitor on every Ray pod's metrics port;
* ``grafana-dashboard.json`` (+ ``grafana-dashboard-configmap.yaml`` for Grafana's sidecar).

``check_rendered`` re-renders and diffs against the committed files (a test does this in CI).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import yaml

from serve.app.metrics import dashboard_panels
from serve.config import ConfigError, RouterServeConfig, config_from_dict
from serve.config.common import _looks_like_ref
from serve.config.loading import _set_dotted

from .k8s_capacity import CPU_POOL, CPU_POOL_PER_POD, capacity_table, ray_resources_param, replica_bounds
from .serve_config import serve_config

METRICS_PORT = 8080
SERVE_PORT = 8000
CONTROL_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}  # Ray's control plane, on the head
HEAD_PORTS = {**CONTROL_PORTS, "serve": SERVE_PORT, "metrics": METRICS_PORT}
WORKER_PORTS = {"serve": SERVE_PORT, "metrics": METRICS_PORT}
ARTIFACT_VOLUME = "artifacts"
class _Dumper(yaml.SafeDumper):
    """Block style, no anchors/aliases, multi-line strings as literal blocks (readable serveConfigV2)."""

    def ignore_aliases(self, data):
        return True


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def header(cfg: RouterServeConfig) -> str:
    return (f"# Rendered by `routerserve k8s render` from the config of `{cfg.k8s.name}` (its k8s section; k8s.out_dir: "
            f"{cfg.k8s.out_dir}). Do not edit:\n# change the config and re-render; a test diffs this file against a fresh "
            "render.\n")


def cluster_config(cfg: RouterServeConfig) -> RouterServeConfig:
    """The config the cluster runs: artifact paths under the mount path, HTTP on all interfaces,
    Ray joined (not started), then ``k8s.overrides``. Errors name the override's key."""
    k = cfg.k8s
    root = k.artifacts.mount_path.rstrip("/")
    data = cfg.model_dump(mode="json")
    data.pop("k8s")
    data["data_dir"] = f"{root}/data"
    data["index"]["dir"] = f"{root}/index"
    if data["experts"]["dir"] is not None:
        data["experts"]["dir"] = f"{root}/experts"
    data["llm"]["model_cache_dir"] = f"{root}/models"
    data["llm"]["model_cache_writable"] = False  # the artifacts volume is mounted read-only
    data["http"]["host"] = "0.0.0.0"
    data["ray"] = {"address": "auto", "num_cpus": None, "include_dashboard": False}
    for key, value in k.overrides.items():
        try:
            _set_dotted(data, key, copy.deepcopy(value))
        except ConfigError as exc:
            raise ConfigError(f"k8s.overrides.{exc}") from None
    try:
        ccfg = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"k8s.overrides (the cluster config): {exc}") from None
    placed = ccfg.model_dump(mode="json")  # validated first: every deployment has its options now
    _place_cpu_only_on_the_cpu_group(placed)
    _drain_on_shutdown(placed, drain_s(ccfg))
    ccfg = config_from_dict(placed)
    _check_paths_on_volume(ccfg, root)
    _check_secrets_and_gpus(cfg, ccfg)
    if k.ha.enabled:
        _check_replicated(ccfg, k.ha.min_replicas)
    if k.image_digest is None and not k.security.allow_mutable_image:
        raise ConfigError("k8s.image_digest: the pods would run a tag that can move; set the pushed image's digest "
                          "(sha256:…), or k8s.security.allow_mutable_image: true")
    if ccfg.http.api_keys_env is None and not k.security.allow_anonymous_api:
        raise ConfigError("http.api_keys_env: the cluster would serve without API keys; set it in k8s.overrides "
                          "(and map the variable in k8s.secret_env), or k8s.security.allow_anonymous_api: true (dev)")
    return ccfg


def _deployment_option_dicts(data: dict[str, Any]) -> list[dict[str, Any]]:
    options = [data["deployments"][role] for role in ("ingress", "encoder", "shard")]
    return options + [data["llm"]["controller"], *(e["deployment"] for e in data["llm"]["engines"].values())]


def _drain_on_shutdown(data: dict[str, Any], seconds: int) -> None:
    """A replica that is stopped (downscale, upgrade) finishes its requests first: Serve's
    graceful_shutdown_timeout_s (default 20 s) raised to the longest request deadline."""
    for opts in _deployment_option_dicts(data):
        opts["graceful_shutdown_timeout_s"] = max(seconds, opts.get("graceful_shutdown_timeout_s") or 0)


def _place_cpu_only_on_the_cpu_group(data: dict[str, Any]) -> None:
    """Every deployment that asks for no GPU also asks for one unit of CPU_POOL, which only the
    CPU group's pods advertise: GPU pods run GPU work only (and can scale down when it is gone)."""
    for opts in _deployment_option_dicts(data):
        actor = opts.setdefault("ray_actor_options", {})
        if not actor.get("num_gpus"):
            actor.setdefault("resources", {})[CPU_POOL] = 1


HA_ROLES = {"ingress": "deployments.ingress", "shard": "deployments.shard", "controller": "llm.controller"}


def _check_replicated(ccfg: RouterServeConfig, least: int) -> None:
    """HA: the request path's deployments keep at least ``least`` replicas, one per pod."""
    options = {"ingress": ccfg.deployments.ingress, "shard": ccfg.deployments.shard}
    if ccfg.llm.enabled and ccfg.llm.router is not None:
        options["controller"] = ccfg.llm.controller
    for role, opts in options.items():
        lo, _ = replica_bounds(opts)
        if lo < least or opts.get("max_replicas_per_node") != 1:
            raise ConfigError(f"k8s.overrides.{HA_ROLES[role]}: k8s.ha needs at least {least} replicas "
                              f"(min_replicas / num_replicas, now {lo}) and max_replicas_per_node: 1 (now "
                              f"{opts.get('max_replicas_per_node')}), so that losing one pod keeps it serving; or "
                              "k8s.ha.enabled: false")


def _check_secrets_and_gpus(cfg: RouterServeConfig, ccfg: RouterServeConfig) -> None:
    if ccfg.http.api_keys_env and ccfg.http.api_keys_env not in cfg.k8s.secret_env:
        raise ConfigError(f"k8s.secret_env: http.api_keys_env names ${ccfg.http.api_keys_env}; map it to a "
                          f"secret ({ccfg.http.api_keys_env}: {{secret: NAME, key: KEY}})")
    for name, engine in ccfg.llm.engines.items():
        if ccfg.llm.enabled and engine.api_key_env and engine.api_key_env not in cfg.k8s.secret_env:
            raise ConfigError(f"k8s.secret_env: engine {name} reads ${engine.api_key_env}; map it to a "
                              f"secret ({engine.api_key_env}: {{secret: NAME, key: KEY}})")
    wants_gpu = [d["name"] for d in _deployment_options(ccfg) if (d.get("ray_actor_options") or {}).get("num_gpus")]
    if wants_gpu and cfg.k8s.gpu_workers is None:
        raise ConfigError(f"k8s.gpu_workers: deployments {wants_gpu} ask for GPUs but there is no GPU worker group")
    if wants_gpu and cfg.k8s.gpu_workers.gpus == 0:
        raise ConfigError(f"k8s.gpu_workers.gpus: deployments {wants_gpu} ask for GPUs but the group's pods have none")


def _deployment_options(ccfg: RouterServeConfig) -> list[dict[str, Any]]:
    return serve_config(ccfg, host="0.0.0.0")["applications"][0]["deployments"]


def _check_paths_on_volume(ccfg: RouterServeConfig, root: str) -> None:
    """A local file path in the cluster config must point into the artifacts volume."""
    paths = {"model.ref": ccfg.model.ref}
    paths.update({f"llm.engines.{n}.model": e.model for n, e in ccfg.llm.engines.items() if e.kind in ("vllm", "transformers")})
    if ccfg.llm.router is not None and ccfg.llm.router.prompt_file is not None:
        paths["llm.router.prompt_file"] = str(ccfg.llm.router.prompt_file)
    paths.update({f"llm.candidates.{i}.instruction_file": str(c.instruction_file)
                  for i, c in enumerate(ccfg.llm.candidates) if c.instruction_file is not None})
    for key, ref in paths.items():
        if key.endswith(("prompt_file", "instruction_file")) or not _looks_like_ref(ref):
            if not (ref == root or ref.startswith(root + "/")):
                raise ConfigError(f"{key}: {ref} is a local path; put it under {root} (the artifacts volume) "
                                  f"and set it in k8s.overrides")


def render_serve_config(cfg: RouterServeConfig) -> dict[str, Any]:
    return serve_config(cluster_config(cfg), host="0.0.0.0")


def _labels(cfg: RouterServeConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "routerserve", "app.kubernetes.io/instance": cfg.k8s.name}


def _env(cfg: RouterServeConfig) -> list[dict[str, Any]]:
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
        for name, ref in sorted(cfg.k8s.secret_env.items())
    ]


OPT_OUTS_ANNOTATION = "routerserve.io/security-opt-outs"  # what k8s.security switched off, for the validator


def container_security(cfg: RouterServeConfig) -> dict[str, Any]:
    """Pod Security "restricted" for one container: non-root, no privilege escalation, no
    capabilities, the runtime's default seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": cfg.k8s.security.run_as_user, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def security_opt_outs(cfg: RouterServeConfig) -> list[str]:
    sec = cfg.k8s.security
    return [name for name, off in (("ray_auth", sec.ray_auth == "disabled"), ("network_policy", not sec.network_policy),
                                   ("anonymous_api", sec.allow_anonymous_api),
                                   ("mutable_image", cfg.k8s.image_digest is None),
                                   ("ha", not cfg.k8s.ha.enabled)) if off]


def image_ref(cfg: RouterServeConfig) -> str:
    """The image the Ray pods run: pinned by digest when k8s.image_digest is set."""
    return f"{cfg.k8s.image}@{cfg.k8s.image_digest}" if cfg.k8s.image_digest else cfg.k8s.image


def drain_s(ccfg: RouterServeConfig) -> int:
    """How long a replica, a pod or an old cluster is given to finish its requests: the longest
    request deadline of the cluster config (the proxy's backstop, RouterServeConfig.proxy_timeout_s,
    which the Serve YAML's http_options.request_timeout_s holds too)."""
    return math.ceil(ccfg.proxy_timeout_s())


def _container(cfg: RouterServeConfig, name: str, cpu: str, memory: str, gpus: int, ports: dict[str, int],
               secrets: bool = False) -> dict:
    """``secrets``: the secret env (k8s.secret_env) — only on the group whose replicas read it."""
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name,
        "image": image_ref(cfg),
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": n, "containerPort": p} for n, p in ports.items()],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [
            {"name": ARTIFACT_VOLUME, "mountPath": cfg.k8s.artifacts.mount_path, "readOnly": True},
            {"name": "ray-logs", "mountPath": "/tmp/ray"},
        ],
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
        "securityContext": container_security(cfg),
    }
    env = _env(cfg) if secrets else []
    if env:
        container["env"] = env
    return container


def _pod_template(cfg: RouterServeConfig, container: dict, group: str, drain: int, tolerations=(), node_selector=None) -> dict:
    a = cfg.k8s.artifacts
    if a.pvc is not None:
        volume = {"name": ARTIFACT_VOLUME, "persistentVolumeClaim": {"claimName": a.pvc, "readOnly": True}}
    else:
        volume = {"name": ARTIFACT_VOLUME, "emptyDir": {"sizeLimit": a.fetch.size_limit}}
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [volume, {"name": "ray-logs", "emptyDir": {}}],
        "restartPolicy": "Never",  # autoscaler v2: a Ray node is never restarted in place
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": drain,  # a pod scaled down finishes its requests
    }
    if a.fetch is not None:
        spec["initContainers"] = [{
            "name": "fetch-artifacts",
            "image": a.fetch.image,
            "command": list(a.fetch.command),
            "env": [{"name": "ARTIFACTS_DIR", "value": a.mount_path}] + _env(cfg),
            "volumeMounts": [{"name": ARTIFACT_VOLUME, "mountPath": a.mount_path}],
            "securityContext": container_security(cfg),
        }]
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if cfg.k8s.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in cfg.k8s.image_pull_secrets]
    if group != "head" and cfg.k8s.ha.enabled:  # a group's pods on different nodes where the cluster allows
        spec["topologySpreadConstraints"] = [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": _group_labels(cfg, group)},
        }]
    return {"metadata": {"labels": _group_labels(cfg, group)}, "spec": spec}


def _group_labels(cfg: RouterServeConfig, group: str) -> dict[str, str]:
    return {**_labels(cfg), "routerserve/group": group}


def _worker_group(cfg: RouterServeConfig, name: str, group, drain: int) -> dict:
    # the CPU group runs every deployment that reads a secret (the ingress: API keys; remote engines)
    container = _container(cfg, "ray-worker", group.cpu, group.memory, group.gpus, WORKER_PORTS, secrets=name == "cpu")
    params = {"metrics-export-port": str(METRICS_PORT)}
    if name == "cpu":  # the only pods CPU-only deployments may use (_place_cpu_only_on_the_cpu_group)
        params["resources"] = ray_resources_param({CPU_POOL: CPU_POOL_PER_POD})
    return {
        "groupName": name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": params,
        "template": _pod_template(cfg, container, name, drain, group.tolerations, group.node_selector),
    }


def render_rayservice(cfg: RouterServeConfig, serve_doc: dict[str, Any] | None = None) -> dict[str, Any]:
    k = cfg.k8s
    serve_doc = serve_doc if serve_doc is not None else render_serve_config(cfg)
    head = _container(cfg, "ray-head", k.head.cpu, k.head.memory, 0, HEAD_PORTS)
    drain = math.ceil(serve_doc["http_options"]["request_timeout_s"])  # the cluster config's drain_s
    workers = [_worker_group(cfg, "cpu", k.cpu_workers, drain)]
    if k.gpu_workers is not None:
        workers.append(_worker_group(cfg, "gpu", k.gpu_workers, drain))
    metadata: dict[str, Any] = {"name": k.name, "namespace": k.namespace, "labels": _labels(cfg)}
    opted_out = security_opt_outs(cfg)
    if opted_out:
        metadata["annotations"] = {OPT_OUTS_ANNOTATION: ",".join(opted_out)}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "upgradeStrategy": _upgrade_strategy(cfg),
            # the head also runs a Serve proxy; out of the serve service, a head restart drops no traffic
            **({"excludeHeadPodFromServeSvc": True} if k.ha.enabled else {}),
            # the old cluster outlives the switch by the longest request's deadline
            "rayClusterDeletionDelaySeconds": drain,
            "serveConfigV2": dump_yaml(serve_doc),
            "rayClusterConfig": {
                "rayVersion": k.ray_version,
                "enableInTreeAutoscaling": True,
                # token: the operator creates the secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every
                # Ray container (KubeRay >= 1.5.1, Ray >= 2.52)
                "authOptions": {"mode": k.security.ray_auth},
                **({"gcsFaultToleranceOptions": _gcs_fault_tolerance(cfg)} if k.ha.enabled else {}),
                "autoscalerOptions": {
                    "version": "v2",
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": k.idle_timeout_s,
                    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                  "limits": {"cpu": "500m", "memory": "512Mi"}},
                    "securityContext": container_security(cfg),
                },
                "headGroupSpec": {
                    # no Serve replicas or tasks on the head: it keeps the GCS, the Serve
                    # controller and the autoscaler responsive under load
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": _pod_template(cfg, head, "head", drain),
                },
                "workerGroupSpecs": workers,
            },
        },
    }


def _gcs_fault_tolerance(cfg: RouterServeConfig) -> dict[str, Any]:
    """The GCS keeps its state in the external Redis: a lost head pod comes back with the cluster's
    actors, Serve applications and placement, and the workers reconnect."""
    ha = cfg.k8s.ha
    options: dict[str, Any] = {"redisAddress": ha.redis_address}
    if ha.redis_password is not None:
        options["redisPassword"] = {"valueFrom": {"secretKeyRef": {"name": ha.redis_password.secret,
                                                                    "key": ha.redis_password.key}}}
    return options


def render_disruption_budgets(cfg: RouterServeConfig) -> list[dict[str, Any]]:
    """One PodDisruptionBudget per worker group: a node drain takes one pod of a group at a time."""
    if not cfg.k8s.ha.enabled:
        return []
    groups = ["cpu"] + (["gpu"] if cfg.k8s.gpu_workers is not None else [])
    return [{
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{cfg.k8s.name}-{group}", "namespace": cfg.k8s.namespace, "labels": _labels(cfg)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _group_labels(cfg, group)}},
    } for group in groups]


def _upgrade_strategy(cfg: RouterServeConfig) -> dict[str, Any]:
    k = cfg.k8s
    strategy: dict[str, Any] = {"type": k.upgrade_strategy}
    if k.upgrade_strategy == "NewClusterWithIncrementalUpgrade":
        u = k.incremental_upgrade
        strategy["clusterUpgradeOptions"] = {"gatewayClassName": u.gateway_class_name, "intervalSeconds": u.interval_seconds,
                                             "stepSizePercent": u.step_size_percent, "maxSurgePercent": u.max_surge_percent}
    return strategy


def render_network_policy(cfg: RouterServeConfig) -> dict[str, Any] | None:
    """Ingress to the Ray pods: anything between this cluster's own pods; the Ray control plane
    (GCS, dashboard/Jobs API, client) also from the KubeRay operator; Serve (8000) from this
    namespace and k8s.security.serve_from_namespaces; metrics from the monitoring namespace."""
    k, sec = cfg.k8s, cfg.k8s.security
    if not sec.network_policy:
        return None

    def namespace(name: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    def ports(*numbers: int) -> list[dict[str, Any]]:
        return [{"protocol": "TCP", "port": n} for n in numbers]

    own_pods = {"podSelector": {"matchLabels": _labels(cfg)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{k.name}-ray", "namespace": k.namespace, "labels": _labels(cfg)},
        "spec": {
            "podSelector": {"matchLabels": _labels(cfg)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own_pods]},
                {"from": [namespace(sec.operator_namespace)], "ports": ports(*CONTROL_PORTS.values(), SERVE_PORT)},
                {"from": [{"podSelector": {}}, *(namespace(n) for n in sec.serve_from_namespaces)], "ports": ports(SERVE_PORT)},
                {"from": [namespace(sec.monitoring_namespace)], "ports": ports(METRICS_PORT)},
            ],
        },
    }


def render_pvc(cfg: RouterServeConfig) -> dict[str, Any] | None:
    a = cfg.k8s.artifacts
    if a.pvc is None or not a.create_pvc:
        return None
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": a.storage}}}
    if a.storage_class:
        spec["storageClassName"] = a.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": a.pvc, "namespace": cfg.k8s.namespace, "labels": _labels(cfg)}, "spec": spec}


def render_podmonitor(cfg: RouterServeConfig) -> dict[str, Any] | None:
    m = cfg.k8s.monitoring
    if not m.pod_monitor:
        return None
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{cfg.k8s.name}-ray", "namespace": cfg.k8s.namespace, "labels": {**_labels(cfg), **m.labels}},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/instance": cfg.k8s.name}},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": m.scrape_interval}],
        },
    }


def render_dashboard(cfg: RouterServeConfig) -> dict[str, Any]:
    panels = []
    for i, (title, expr, unit) in enumerate(dashboard_panels()):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "gridPos": {"x": (i % 2) * 12, "y": (i // 2) * 8, "w": 12, "h": 8},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"expr": expr, "refId": "A", "legendFormat": "__auto"}],
        })
    return {
        "title": f"routerserve ({cfg.k8s.name})", "uid": f"routerserve-{cfg.k8s.name}", "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["routerserve", "ray-serve"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            # the namespace label the PodMonitor's scrape adds: one deployment's series, not every cluster's
            {"name": "namespace", "type": "custom", "query": cfg.k8s.namespace,
             "current": {"text": cfg.k8s.namespace, "value": cfg.k8s.namespace}},
        ]},
        "panels": panels,
    }


def render_dashboard_configmap(cfg: RouterServeConfig, dashboard: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{cfg.k8s.name}-grafana-dashboard", "namespace": cfg.k8s.namespace,
                     "labels": {**_labels(cfg), "grafana_dashboard": "1"}},  # Grafana's sidecar picks these up
        "data": {"routerserve.json": json.dumps(dashboard, indent=2)},
    }


def render_all(cfg: RouterServeConfig) -> dict[str, str]:
    """File name → text, everything ``k8s render`` writes."""
    serve_doc = render_serve_config(cfg)
    files = {
        "rayservice.yaml": header(cfg) + dump_yaml(render_rayservice(cfg, serve_doc)),
        "serve-config.yaml": header(cfg) + dump_yaml(serve_doc),
    }
    pvc = render_pvc(cfg)
    if pvc is not None:
        files["artifacts-pvc.yaml"] = header(cfg) + dump_yaml(pvc)
    policy = render_network_policy(cfg)
    if policy is not None:
        files["networkpolicy.yaml"] = header(cfg) + dump_yaml(policy)
    budgets = render_disruption_budgets(cfg)
    if budgets:
        files["disruption-budgets.yaml"] = header(cfg) + "---\n".join(dump_yaml(b) for b in budgets)
    monitor = render_podmonitor(cfg)
    if monitor is not None:
        files["podmonitor.yaml"] = header(cfg) + dump_yaml(monitor)
    files["packing.md"] = (
        "<!-- Rendered by `routerserve k8s render` (serve/deploy/k8s_capacity.py); do not edit. -->\n"
        f"# Packing of `{cfg.k8s.name}`: worker groups and the Serve replicas packed onto them\n\n"
        + capacity_table(render_rayservice(cfg, serve_doc)))
    if cfg.k8s.monitoring.grafana_dashboard:
        dashboard = render_dashboard(cfg)
        files["grafana-dashboard.json"] = json.dumps(dashboard, indent=2) + "\n"
        files["grafana-dashboard-configmap.yaml"] = header(cfg) + dump_yaml(render_dashboard_configmap(cfg, dashboard))
    return files


def write_rendered(cfg: RouterServeConfig, out_dir: Path | None = None) -> list[Path]:
    out_dir = Path(out_dir or cfg.k8s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all(cfg).items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written


def check_rendered(cfg: RouterServeConfig, out_dir: Path | None = None) -> list[str]:
    """Files under ``out_dir`` that differ from (or are missing in) a fresh render."""
    out_dir = Path(out_dir or cfg.k8s.out_dir)
    stale = []
    for name, text in render_all(cfg).items():
        path = out_dir / name
        if not path.is_file() or path.read_text() != text:
            stale.append(name)
    return stale


def load_objects(out_dir: Path) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered YAML files."""
    objects = []
    for path in sorted(Path(out_dir).glob("*.yaml")):
        if path.name == "serve-config.yaml":
            continue
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects
