"""Validating the rendered Kubernetes objects without a cluster.

1. custom resources (RayService) against the KubeRay CRD's ``openAPIV3Schema``, read from a CRD
   directory (default ``../shared/k8s``: KubeRay v1.7.0's CRD files; point ``--crd-dir`` at the
   release you run). Fields the schema does not declare are errors too: the API server would
   silently prune them, which is how a typo'd field gets lost;
2. core objects (PVC, ConfigMap, and every pod template inside the RayService) against the
   Kubernetes JSON schemas of ``kubernetes-validate`` (strict: unknown fields are errors);
3. the embedded ``serveConfigV2`` with Ray Serve's own ``ServeDeploySchema``, then every
   ``import_path`` imported and called with its args, and the deployment names in the config
   checked against the built application (Serve rejects unknown names at deploy time);
4. the KubeRay controller's rules that the CRD does not encode (``validation.go``);
5. capacity: every Serve deployment's replicas fit the worker groups' pods, at minimum and at
   maximum scale (``serve.deploy.k8s_capacity``);
6. lifecycle: the old cluster after an upgrade (``rayClusterDeletionDelaySeconds``), a stopped
   replica (``graceful_shutdown_timeout_s``) and a pod scaled down (``terminationGracePeriodSeconds``)
   each get at least the longest request deadline (``http_options.request_timeout_s``);
7. availability: no single point of failure — GCS fault tolerance, the head out of the Serve
   service, >= 2 replicas one per pod on the request path, a PodDisruptionBudget and a topology
   spread per worker group (unless the opt-out annotation names "ha");
8. security: Ray token auth, a NetworkPolicy that keeps the control plane off the open pod network,
   Pod Security "restricted" fields on every container, the service's API keys on, the image
   pinned by digest — each unless the RayService's ``routerserve.io/security-opt-outs``
   annotation names it.

Each check returns a list of messages ("where: what"); empty means valid.
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from serve.config import REPO_ROOT

from .k8s import CONTROL_PORTS, OPT_OUTS_ANNOTATION
from .k8s_capacity import capacity, replica_bounds

CRD_DIR_ENV = "ROUTERSERVE_KUBERAY_CRDS"
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")


def default_crd_dir() -> Path:
    return Path(os.environ.get(CRD_DIR_ENV) or REPO_ROOT.parent / "shared" / "k8s")


# -- 1. custom resources against the CRD schemas ------------------------------------------------


def load_crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → openAPIV3Schema, for every CRD file in ``crd_dir``."""
    crd_dir = Path(crd_dir)
    if not crd_dir.is_dir():
        raise FileNotFoundError(f"CRD directory {crd_dir} does not exist (set --crd-dir or ${CRD_DIR_ENV})")
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    if not schemas:
        raise FileNotFoundError(f"no CustomResourceDefinition found in {crd_dir}")
    return schemas


def _no_unknown_fields(schema: Any) -> Any:
    """A copy where every object schema with declared properties rejects other fields, as the API
    server's pruning would drop them (except where the CRD preserves unknown fields)."""
    if isinstance(schema, list):
        return [_no_unknown_fields(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_unknown_fields(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _where(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<root>"


def validate_custom_resource(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    import jsonschema

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        return [f"{key[1]}: no CRD for apiVersion {key[0]} (have {sorted(schemas)})"]
    schema = _no_unknown_fields(copy.deepcopy(schemas[key]))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by the API server itself
    validator = jsonschema.Draft7Validator(schema)
    return [f"{obj['kind']}.{_where(e)}: {e.message}" for e in sorted(validator.iter_errors(obj), key=str)]


# -- 2. core objects against the Kubernetes schemas ---------------------------------------------


def pod_templates(obj: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    if obj.get("kind") != "RayService":
        return
    rc = obj["spec"]["rayClusterConfig"]
    yield "headGroupSpec.template", rc["headGroupSpec"]["template"]
    for i, group in enumerate(rc.get("workerGroupSpecs", [])):
        yield f"workerGroupSpecs.{i}({group.get('groupName')}).template", group["template"]


def validate_core_object(obj: dict[str, Any], kubernetes_version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {exc.message} at {_where(exc)}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{obj.get('kind')}: no Kubernetes {kubernetes_version} schema for {obj.get('apiVersion')}"]
    return []


def validate_pod_templates(obj: dict[str, Any], kubernetes_version: str) -> list[str]:
    errors = []
    for where, template in pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        errors += [f"{obj['kind']}.{where}: {e.split(': ', 1)[1]}" for e in validate_core_object(wrapped, kubernetes_version)]
    return errors


# -- 3. the embedded Serve config ---------------------------------------------------------------


def _rebase(value: Any, path_map: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _rebase(v, path_map) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, path_map) for v in value]
    if isinstance(value, str):
        for src, dst in path_map.items():
            if value == src or value.startswith(src.rstrip("/") + "/"):
                return dst.rstrip("/") + value[len(src.rstrip("/")):]
    return value


def _files(roots) -> dict[str, tuple[int, int]]:
    """path → (size, mtime) of every file under ``roots``: what a read-only mount must not see change."""
    out = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                out[path] = (st.st_size, st.st_mtime_ns)
    return out


def llm_model_errors(config: dict[str, Any]) -> list[str]:
    """Each LLM engine's model resolved as its replica will (``llm.model_cache_writable``: false on
    the cluster): a conversion missing from the artifacts is named here, not in a crash loop."""
    from serve.app.chat.llm_pool import engine_model_path
    from serve.config import config_from_dict

    llm = config_from_dict(config).llm if config else None
    if llm is None or not llm.enabled:
        return []
    errors = []
    for name, engine in llm.engines.items():
        try:
            engine_model_path(engine, Path(llm.model_cache_dir), llm.model_cache_writable)
        except Exception as exc:  # noqa: BLE001 - the resolution error is the finding
            errors.append(f"llm.engines.{name}.model: {type(exc).__name__}: {exc}")
    return errors


def validate_serve_config(serve_doc: dict[str, Any] | str, build: bool = True,
                          path_map: dict[str, str] | None = None) -> list[str]:
    """``path_map`` rewrites path prefixes in the args before building (e.g. the artifacts mount
    path → a local folder with the same layout), so the builders run here as on the cluster."""
    from pydantic import ValidationError
    from ray.serve._private.build_app import build_app as serve_build_app
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(serve_doc) if isinstance(serve_doc, str) else serve_doc
    try:
        ServeDeploySchema.model_validate(doc)
    except ValidationError as exc:
        return [f"serveConfigV2.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    errors = []
    for app in doc["applications"]:
        where = f"serveConfigV2.applications[{app['name']}]"
        module_name, _, attr = app["import_path"].replace(":", ".").rpartition(".")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{where}.import_path: {app['import_path']} does not import ({exc})")
            continue
        if not build:
            continue
        args = _rebase(app.get("args") or {}, path_map or {})
        before = _files(path_map.values() if path_map else ())
        try:
            built = serve_build_app(builder(args), name=app["name"])
        except Exception as exc:  # the builder's own error is the finding
            errors.append(f"{where}.args: building {app['import_path']} failed: {type(exc).__name__}: {exc}")
            continue
        errors += [f"{where}.args.config.{e}" for e in llm_model_errors(args.get("config") or {})]
        written = sorted(k for k in set(_files(path_map.values() if path_map else ()).items()) ^ set(before.items()))
        if written:
            errors.append(f"{where}: building the app and resolving its models wrote under the artifacts folder, which the "
                          f"cluster mounts read-only: {sorted({w[0] for w in written})[:5]}")
        names = {d.name for d in built.deployments}
        for dep in app.get("deployments", []):
            if dep["name"] not in names:
                errors.append(f"{where}.deployments: {dep['name']!r} is not a deployment of the app {sorted(names)}")
    return errors


# -- 4. KubeRay's controller rules --------------------------------------------------------------


def kuberay_rules(obj: dict[str, Any]) -> list[str]:
    """The rules of KubeRay's ``validation.go`` (v1.7.0) that the CRD schema does not encode."""
    if obj.get("kind") != "RayService":
        return []
    errors = []
    spec = obj.get("spec", {})
    rc = spec.get("rayClusterConfig", {})
    for i, g in enumerate(rc.get("workerGroupSpecs", [])):
        where = f"RayService.spec.rayClusterConfig.workerGroupSpecs[{i}]({g.get('groupName')})"
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1), g.get("replicas")
        if lo < 0 or hi < 0:
            errors.append(f"{where}: minReplicas and maxReplicas must be non-negative ({lo}, {hi})")
        if lo > hi:
            errors.append(f"{where}: minReplicas {lo} is greater than maxReplicas {hi}")
        if n is not None and n < 0:
            errors.append(f"{where}: replicas must be non-negative ({n})")
    names = [g.get("groupName") for g in rc.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        errors.append(f"RayService.spec.rayClusterConfig.workerGroupSpecs: groupName repeats ({names})")
    head_service = rc.get("headGroupSpec", {}).get("headService") or {}
    if (head_service.get("metadata") or {}).get("name"):
        errors.append("RayService.spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set "
                      "for a RayService (KubeRay names the head service)")
    upgrade = spec.get("upgradeStrategy") or {}
    utype = upgrade.get("type")
    if utype is not None and utype not in UPGRADE_TYPES:
        errors.append(f"RayService.spec.upgradeStrategy.type: {utype!r} is not one of {list(UPGRADE_TYPES)}")
    if utype == "NewClusterWithIncrementalUpgrade":
        if not rc.get("enableInTreeAutoscaling"):
            errors.append("RayService.spec.upgradeStrategy: incremental upgrades need enableInTreeAutoscaling: true")
        opts = upgrade.get("clusterUpgradeOptions")
        if not opts:
            errors.append("RayService.spec.upgradeStrategy.clusterUpgradeOptions: required for incremental upgrades")
        else:
            step, surge = opts.get("stepSizePercent", -1), opts.get("maxSurgePercent", 100)
            if not 0 <= step <= surge <= 100:
                errors.append(f"RayService.spec.upgradeStrategy.clusterUpgradeOptions: need 0 <= stepSizePercent "
                              f"({step}) <= maxSurgePercent ({surge}) <= 100")
    version = (rc.get("autoscalerOptions") or {}).get("version")
    if version is not None:
        for where, template in pod_templates(obj):
            for c in template.get("spec", {}).get("containers", []):
                if any(e.get("name") == "RAY_enable_autoscaler_v2" for e in c.get("env", [])):
                    errors.append(f"RayService.{where}: RAY_enable_autoscaler_v2 is set together with "
                                  f"autoscalerOptions.version; use one")
    return errors


# -- cross-object checks of our own -------------------------------------------------------------



def _restricted(context: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """What a container's securityContext (with its pod's) lacks of Pod Security "restricted"."""
    missing = []
    if context.get("allowPrivilegeEscalation") is not False:
        missing.append("allowPrivilegeEscalation: false")
    if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
        missing.append("capabilities.drop: [ALL]")
    if not context.get("runAsNonRoot", pod.get("runAsNonRoot")):
        missing.append("runAsNonRoot: true")
    seccomp = (context.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        missing.append("seccompProfile.type: RuntimeDefault")
    return missing


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _opt_outs(svc: dict[str, Any]) -> set[str]:
    return set(filter(None, ((svc.get("metadata") or {}).get("annotations") or {}).get(OPT_OUTS_ANNOTATION, "").split(",")))


HA_DEPLOYMENTS = ("RetrievalIngress", "SearchShard", "RouterR1Controller")  # the request path (name prefixes)


def availability(objects: list[dict[str, Any]]) -> list[str]:
    """No single point of failure, unless the opt-out annotation names "ha": the GCS state in an
    external Redis, the head out of the Serve service, two or more replicas one per pod for the
    request path, a PodDisruptionBudget and a topology spread for every worker group."""
    errors = []
    budgets = [o for o in objects if o.get("kind") == "PodDisruptionBudget"]
    for svc in (o for o in objects if o.get("kind") == "RayService"):
        if "ha" in _opt_outs(svc):
            continue
        rc = svc["spec"]["rayClusterConfig"]
        if not (rc.get("gcsFaultToleranceOptions") or {}).get("redisAddress"):
            errors.append("RayService.spec.rayClusterConfig.gcsFaultToleranceOptions: no external Redis — losing the head "
                          "pod takes the Serve application down and every engine cold-starts")
        if not svc["spec"].get("excludeHeadPodFromServeSvc"):
            errors.append("RayService.spec.excludeHeadPodFromServeSvc: not true — a head restart drops the traffic its "
                          "proxy holds")
        doc = yaml.safe_load(svc["spec"]["serveConfigV2"])
        for d in (doc.get("applications") or [{}])[0].get("deployments", []):
            if d["name"].startswith(HA_DEPLOYMENTS):
                lo, _ = replica_bounds(d)
                if lo < 2 or d.get("max_replicas_per_node") != 1:
                    errors.append(f"serveConfigV2.deployments[{d['name']}]: {lo} replica(s) at minimum, "
                                  f"max_replicas_per_node {d.get('max_replicas_per_node')} — one lost pod is an outage "
                                  "(need >= 2, one per pod)")
        for i, g in enumerate(rc.get("workerGroupSpecs", [])):
            labels = g["template"].get("metadata", {}).get("labels", {})
            where = f"RayService.workerGroupSpecs.{i}({g.get('groupName')})"
            if not any(_selects(b["spec"].get("selector") or {}, labels) for b in budgets):
                errors.append(f"{where}: no PodDisruptionBudget selects its pods (a node drain may take them all)")
            if not g["template"]["spec"].get("topologySpreadConstraints"):
                errors.append(f"{where}.template.spec.topologySpreadConstraints: none — its pods may share one node")
    return errors


def lifecycle(obj: dict[str, Any]) -> list[str]:
    """Nothing in flight is cut: the old cluster after an upgrade, a stopped replica and a pod
    scaled down each get at least the longest request deadline (the proxy's request_timeout_s)."""
    if obj.get("kind") != "RayService":
        return []
    doc = yaml.safe_load(obj["spec"]["serveConfigV2"])
    deadline = (doc.get("http_options") or {}).get("request_timeout_s")
    if not deadline:
        return ["serveConfigV2.http_options.request_timeout_s: not set — no request has an end-to-end deadline"]
    errors = []
    delay = obj["spec"].get("rayClusterDeletionDelaySeconds", 60)  # KubeRay's default
    if delay < deadline:
        errors.append(f"RayService.spec.rayClusterDeletionDelaySeconds: {delay} s, below the longest request deadline "
                      f"({deadline:g} s): an upgrade would cut requests on the old cluster")
    for d in (doc.get("applications") or [{}])[0].get("deployments", []):
        grace = d.get("graceful_shutdown_timeout_s", 20)  # Serve's default
        if grace < deadline:
            errors.append(f"serveConfigV2.deployments[{d['name']}].graceful_shutdown_timeout_s: {grace:g} s, below the "
                          f"longest request deadline ({deadline:g} s)")
    for where, template in pod_templates(obj):
        grace = template.get("spec", {}).get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        if grace < deadline:
            errors.append(f"RayService.{where}.terminationGracePeriodSeconds: {grace} s, below the longest request "
                          f"deadline ({deadline:g} s)")
    return errors


def security(objects: list[dict[str, Any]]) -> list[str]:
    """The production profile, unless the RayService's opt-out annotation names the item."""
    errors = []
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    for svc in (o for o in objects if o.get("kind") == "RayService"):
        opted = _opt_outs(svc)
        rc = svc["spec"]["rayClusterConfig"]
        if "ray_auth" not in opted and (rc.get("authOptions") or {}).get("mode") != "token":
            errors.append("RayService.spec.rayClusterConfig.authOptions.mode: not 'token' — GCS (6379), the "
                          "dashboard/Jobs API (8265) and the Ray client (10001) run code for anyone who reaches them")
        for where, template in pod_templates(svc):
            pod = template.get("spec", {})
            for kind in ("initContainers", "containers"):
                for c in pod.get(kind, []):
                    missing = _restricted(c.get("securityContext") or {}, pod.get("securityContext") or {})
                    if missing:
                        errors.append(f"RayService.{where}.{kind}[{c.get('name')}].securityContext: needs {', '.join(missing)}")
        autoscaler = rc.get("autoscalerOptions") or {}
        if rc.get("enableInTreeAutoscaling"):
            missing = _restricted(autoscaler.get("securityContext") or {}, {})
            if missing:
                errors.append(f"RayService.spec.rayClusterConfig.autoscalerOptions.securityContext: needs {', '.join(missing)}")
        if "mutable_image" not in opted:
            for where, template in pod_templates(svc):
                for c in template.get("spec", {}).get("containers", []):
                    if "@sha256:" not in c.get("image", ""):
                        errors.append(f"RayService.{where}.containers[{c.get('name')}].image: {c.get('image')} is a tag "
                                      "that can move; pin it by digest (k8s.image_digest)")
        config = (yaml.safe_load(svc["spec"]["serveConfigV2"]).get("applications") or [{}])[0].get("args", {}).get("config", {})
        if "anonymous_api" not in opted and not (config.get("http") or {}).get("api_keys_env"):
            errors.append("serveConfigV2: http.api_keys_env is not set — the API answers anyone who reaches port 8000")
        if "network_policy" in opted:
            continue
        for where, template in pod_templates(svc):
            labels = template.get("metadata", {}).get("labels", {})
            covering = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                        and _selects(p["spec"].get("podSelector") or {}, labels)]
            if not covering:
                errors.append(f"RayService.{where}: no NetworkPolicy selects these pods (labels {labels})")
            for p in covering:
                for i, rule in enumerate(p["spec"].get("ingress") or []):
                    open_to_all = not rule.get("from") or any(
                        peer.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0")
                        or (peer.get("namespaceSelector") == {} and not (peer.get("podSelector") or {}).get("matchLabels"))
                        for peer in rule.get("from", []))
                    numbers = {port.get("port") for port in rule.get("ports") or []}
                    control = set(CONTROL_PORTS.values())
                    exposed = sorted(control) if not rule.get("ports") else sorted(numbers & control)
                    if open_to_all and exposed:
                        errors.append(f"NetworkPolicy/{p['metadata']['name']}.spec.ingress[{i}]: opens the Ray control "
                                      f"plane {exposed} to every source")
    return errors


def consistency(objects: list[dict[str, Any]], ray_version: str | None = None) -> list[str]:
    """PodMonitor selects the Ray pods and their metrics port; rayVersion matches the image tag."""
    errors = []
    services = [o for o in objects if o.get("kind") == "RayService"]
    for mon in (o for o in objects if o.get("kind") == "PodMonitor"):
        match = mon["spec"]["selector"].get("matchLabels", {})
        ports = {e["port"] for e in mon["spec"]["podMetricsEndpoints"]}
        for svc in services:
            for where, template in pod_templates(svc):
                labels = template.get("metadata", {}).get("labels", {})
                if any(labels.get(k) != v for k, v in match.items()):
                    errors.append(f"PodMonitor/{mon['metadata']['name']}: does not select {where} (labels {labels})")
                named = {p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])}
                if not ports <= named:
                    errors.append(f"PodMonitor/{mon['metadata']['name']}: {where} has no port {sorted(ports - named)}")
    for svc in services:
        rc = svc["spec"]["rayClusterConfig"]
        version = rc.get("rayVersion")
        if ray_version is not None and version != ray_version:
            errors.append(f"RayService.spec.rayClusterConfig.rayVersion: {version} but this Ray is {ray_version}")
        for where, template in pod_templates(svc):
            for c in template["spec"]["containers"]:
                if version and version not in c["image"]:
                    errors.append(f"RayService.{where}: image {c['image']} does not carry rayVersion {version}")
    return errors


def validate_objects(objects: list[dict[str, Any]], crd_dir: Path | None = None, kubernetes_version: str = "1.33",
                     build: bool = True, path_map: dict[str, str] | None = None,
                     ray_version: str | None = None) -> dict[str, list[str]]:
    """All four checks (and the consistency one) over the rendered objects; check name → errors."""
    schemas = load_crd_schemas(crd_dir or default_crd_dir())
    report: dict[str, list[str]] = {"crd": [], "core": [], "serve": [], "kuberay": [], "capacity": [], "lifecycle": [],
                                    "availability": [], "security": [], "consistency": []}
    for obj in objects:
        group = obj.get("apiVersion", "").split("/")[0] if "/" in obj.get("apiVersion", "") else ""
        if obj.get("kind") == "RayService":
            report["crd"] += validate_custom_resource(obj, schemas)
            report["core"] += validate_pod_templates(obj, kubernetes_version)
            report["serve"] += validate_serve_config(obj["spec"]["serveConfigV2"], build=build, path_map=path_map)
            report["kuberay"] += kuberay_rules(obj)
            report["capacity"] += capacity(obj)
            report["lifecycle"] += lifecycle(obj)
        elif group.endswith("monitoring.coreos.com"):
            continue  # the Prometheus operator's CRD is not vendored; checked by consistency()
        else:
            report["core"] += validate_core_object(obj, kubernetes_version)
    report["availability"] += availability(objects)
    report["security"] += security(objects)
    report["consistency"] += consistency(objects, ray_version)
    return report
