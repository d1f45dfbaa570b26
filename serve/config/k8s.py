"""The `k8s` section: what `routerserve k8s render` needs beyond the app config (cluster shape,
image, artifacts, secrets, monitoring, cluster-only overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .common import _Strict


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _at_most(model, low: str, high: str):
    """``model`` unless its field ``low`` is above its field ``high`` (the error names both)."""
    if getattr(model, low) > getattr(model, high):
        raise ValueError(f"{low}: {getattr(model, low)} is above {high} {getattr(model, high)}")
    return model


class K8sHeadConfig(_Strict):
    cpu: str = Field("2", pattern=_QUANTITY, description="requests = limits")
    memory: str = Field("8Gi", pattern=_QUANTITY)


class K8sWorkerGroupConfig(_Strict):
    """One KubeRay worker group; the Ray autoscaler moves its size between min and max replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=0)
    cpu: str = Field("4", pattern=_QUANTITY)
    memory: str = Field("16Gi", pattern=_QUANTITY)
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _min_le_max(self) -> "K8sWorkerGroupConfig":
        return _at_most(self, "min_replicas", "max_replicas")


class K8sFetchConfig(_Strict):
    """Object-storage mode: an init container copies the artifacts into an emptyDir at mount_path."""

    image: str
    command: list[str] = Field(min_length=1, description="runs with $ARTIFACTS_DIR set to the mount path")
    size_limit: str = Field("50Gi", pattern=_QUANTITY)


class K8sArtifactsConfig(_Strict):
    """Where index/, experts/, models/ and data/ (the corpus, hashed to find the index) come from."""

    mount_path: str = Field("/artifacts", pattern=r"^/")
    pvc: str | None = Field("routerserve-artifacts", description="an existing or rendered claim, mounted read-only")
    create_pvc: bool = Field(True, description="render the PersistentVolumeClaim too")
    storage: str = Field("50Gi", pattern=_QUANTITY)
    storage_class: str | None = None
    fetch: K8sFetchConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "K8sArtifactsConfig":
        if (self.pvc is None) == (self.fetch is None):
            raise ValueError("pvc: set exactly one of pvc (a volume) or fetch (object storage)")
        return self


class K8sSecretRef(_Strict):
    secret: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    key: str = Field(min_length=1)


class K8sSecurityConfig(_Strict):
    """The control plane locked down: Ray token auth, a NetworkPolicy, restricted pod security,
    the service's API keys required. Each opt-out is explicit (dev clusters)."""

    ray_auth: Literal["token", "disabled"] = Field(
        "token", description="KubeRay authOptions: token = the operator makes a secret and every Ray "
        "container authenticates GCS, dashboard/Jobs API and client calls with it")
    network_policy: bool = Field(True, description="render a NetworkPolicy for the Ray pods")
    operator_namespace: str = Field("kuberay-system", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                    description="where the KubeRay operator runs (it reaches the dashboard and GCS)")
    serve_from_namespaces: list[str] = Field(
        default_factory=lambda: ["ingress-nginx"],
        description="namespaces (besides this one) allowed to reach the Serve HTTP port 8000")
    monitoring_namespace: str = Field("monitoring", description="the namespace allowed to scrape metrics (8080)")
    allow_anonymous_api: bool = Field(False, description="allow http.api_keys_env: null on the cluster (dev only)")
    allow_mutable_image: bool = Field(False, description="allow an image without k8s.image_digest (a tag can move)")
    run_as_user: int = Field(1000, ge=1, description="the image's non-root user (rayproject/ray: ray, 1000)")


class K8sIncrementalUpgradeConfig(_Strict):
    """KubeRay's clusterUpgradeOptions (upgrade_strategy NewClusterWithIncrementalUpgrade; the
    operator's RayServiceIncrementalUpgrade feature gate and a Gateway API implementation needed)."""

    gateway_class_name: str = Field(..., min_length=1)
    interval_seconds: int = Field(30, ge=1)
    step_size_percent: int = Field(10, ge=0, le=100)
    max_surge_percent: int = Field(100, ge=0, le=100)

    @model_validator(mode="after")
    def _step_le_surge(self) -> "K8sIncrementalUpgradeConfig":
        return _at_most(self, "step_size_percent", "max_surge_percent")


class K8sHAConfig(_Strict):
    """No single point of failure: GCS fault tolerance (the head's state in an external Redis, so a
    lost head pod restarts without taking Serve down), the head out of the Serve service, and the
    request path's deployments replicated across pods."""

    enabled: bool = Field(True, description="false: a dev cluster (recorded in the manifest's opt-out annotation)")
    redis_address: str = Field("redis-master.routerserve.svc.cluster.local:6379", min_length=1,
                               description="host:port of the external Redis that keeps the GCS state")
    redis_password: K8sSecretRef | None = Field(
        default_factory=lambda: K8sSecretRef(secret="routerserve-redis", key="password"),
        description="the Redis password's secret key (null: no password)")
    min_replicas: int = Field(2, ge=2, description="at least this many replicas, one per pod, for the ingress, every "
                              "shard searcher and the Router-R1 controller")


class K8sMonitoringConfig(_Strict):
    pod_monitor: bool = True
    scrape_interval: str = Field("15s", pattern=r"^[0-9]+(s|m)$")
    labels: dict[str, str] = Field(default_factory=lambda: {"release": "prometheus"},
                                   description="labels your Prometheus operator selects monitors by")
    grafana_dashboard: bool = True


class K8sConfig(_Strict):
    """`routerserve k8s render`: a KubeRay RayService (+ PVC, PodMonitor, Grafana dashboard) from
    this same config; ``overrides`` are the dotted keys that differ on the cluster."""

    name: str = Field("routerserve", pattern=_DNS_LABEL)
    namespace: str = Field("routerserve", pattern=_DNS_LABEL)
    image: str = Field("ghcr.io/routerserve/routerserve:0.1.0-ray2.60.0", description="k8s/Dockerfile, built and pushed")
    image_digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$", description="the pushed image's digest: "
                                     "the pods run image@digest (a tag can move; a digest cannot)")
    image_pull_secrets: list[str] = Field(default_factory=list)
    ray_version: str = Field("2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    kubernetes_version: str = Field("1.33", pattern=r"^[0-9]+\.[0-9]+$", description="for validating core objects")
    out_dir: Path = Path("k8s")
    head: K8sHeadConfig = Field(default_factory=K8sHeadConfig)
    cpu_workers: K8sWorkerGroupConfig = Field(default_factory=K8sWorkerGroupConfig)
    gpu_workers: K8sWorkerGroupConfig | None = Field(
        default_factory=lambda: K8sWorkerGroupConfig(
            min_replicas=1, max_replicas=4, cpu="8", memory="48Gi", gpus=1,
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        )
    )
    idle_timeout_s: int = Field(120, ge=0, description="autoscaler: idle worker pods go after this")
    upgrade_strategy: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = "NewCluster"
    incremental_upgrade: K8sIncrementalUpgradeConfig | None = Field(
        None, description="required with upgrade_strategy NewClusterWithIncrementalUpgrade")
    artifacts: K8sArtifactsConfig = Field(default_factory=K8sArtifactsConfig)
    secret_env: dict[str, K8sSecretRef] = Field(default_factory=dict, description="env var → secretKeyRef on every pod")
    monitoring: K8sMonitoringConfig = Field(default_factory=K8sMonitoringConfig)
    security: K8sSecurityConfig = Field(default_factory=K8sSecurityConfig)
    ha: K8sHAConfig = Field(default_factory=K8sHAConfig)
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key → value, applied for the cluster")

    @model_validator(mode="after")
    def _upgrade_options(self) -> "K8sConfig":
        if self.upgrade_strategy == "NewClusterWithIncrementalUpgrade" and self.incremental_upgrade is None:
            raise ValueError("incremental_upgrade: NewClusterWithIncrementalUpgrade needs its options (gateway_class_name, "
                             "interval_seconds, step_size_percent, max_surge_percent)")
        return self

    @field_validator("overrides")
    @classmethod
    def _no_k8s_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key == "k8s" or key.startswith("k8s."):
                raise ValueError(f"{key}: the k8s section cannot override itself")
        return value
