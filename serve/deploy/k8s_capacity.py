"""Does the Serve application fit its KubeRay worker groups?

Read from a rendered RayService: each worker group's pod shape (Ray's CPUs, GPUs and memory from
the container limits or ``rayStartParams``, and its custom Ray resources) and pod count bounds;
each Serve deployment's replica bounds (``num_replicas`` or ``autoscaling_config``) and replica
resources (``ray_actor_options``: ``num_cpus`` — Serve's default 1 —, ``num_gpus``, ``memory``,
``resources``) and ``max_replicas_per_node``. Replicas are packed onto pods first-fit, largest first (GPU, then CPU): at the
deployments' minimum replicas into the groups' ``minReplicas`` pods, at their maximum into
``maxReplicas`` pods. A replica needing a GPU goes to a pod with GPUs; one needing a custom
resource only to pods that advertise it (``CPU_POOL`` keeps CPU-only work off GPU pods).
A replica that fits nowhere is an error naming the deployment and the groups it could use — the
deployment that does not fit on its own (or that grew, at maximum) before the replicas greedy
packing happened to leave over.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

CPU_POOL = "routerserve_cpu_pool"  # a custom Ray resource only the CPU worker group's pods advertise
CPU_POOL_PER_POD = 1000  # integer capacity (KubeRay takes integers); one unit per CPU-only replica
CONFIG_KEYS = {"cpu": "k8s.cpu_workers", "gpu": "k8s.gpu_workers"}  # group name → the config section
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "8", "32Gi") as a number."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value).strip())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def ray_resources_param(resources: dict[str, int]) -> str:
    """``rayStartParams.resources`` in the format KubeRay passes through its shell: a quoted JSON
    object with escaped quotes, e.g. ``"{\\"Custom1\\": 1}"``."""
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def parse_ray_resources_param(value: str | None) -> dict[str, float]:
    if not value:
        return {}
    return {k: float(v) for k, v in json.loads(value.strip().strip('"').replace('\\"', '"')).items()}


@dataclass
class GroupShape:
    name: str
    min_pods: int
    max_pods: int
    cpu: float
    gpu: float
    memory: float
    custom: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        custom = f", {', '.join(f'{k} {v:g}' for k, v in self.custom.items())}" if self.custom else ""
        return f"pods of {self.cpu:g} CPU, {self.gpu:g} GPU, {self.memory / 2**30:g} GiB{custom}"


@dataclass
class Demand:
    name: str
    min_replicas: int
    max_replicas: int
    cpu: float
    gpu: float
    memory: float
    custom: dict[str, float] = field(default_factory=dict)
    per_pod: int | None = None  # Serve's max_replicas_per_node

    def describe(self) -> str:
        custom = "".join(f", {k} {v:g}" for k, v in self.custom.items())
        return f"{self.cpu:g} CPU, {self.gpu:g} GPU{custom} each"


def worker_groups(rayservice: dict[str, Any]) -> list[GroupShape]:
    groups = []
    for g in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        params = g.get("rayStartParams") or {}
        limits = g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        groups.append(GroupShape(
            name=g["groupName"], min_pods=int(g.get("minReplicas", 0)), max_pods=int(g.get("maxReplicas", 0)),
            cpu=quantity(params.get("num-cpus", limits.get("cpu", 0))),
            gpu=quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            memory=quantity(params["memory"]) if "memory" in params else quantity(limits.get("memory", 0)),
            custom=parse_ray_resources_param(params.get("resources")),
        ))
    return groups


def replica_bounds(opts: dict[str, Any]) -> tuple[int, int]:
    """A deployment's (min, max) replicas from its Serve options (``num_replicas: auto``: Serve's
    defaults, 1 to 100)."""
    auto = opts.get("autoscaling_config")
    if auto:
        return int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
    n = opts.get("num_replicas", 1)
    return (1, 100) if n == "auto" else (int(n), int(n))


def serve_demands(serve_doc: dict[str, Any] | str) -> list[Demand]:
    doc = yaml.safe_load(serve_doc) if isinstance(serve_doc, str) else serve_doc
    out = []
    for app in doc.get("applications", []):
        for d in app.get("deployments", []):
            lo, hi = replica_bounds(d)
            opts = d.get("ray_actor_options") or {}
            cpu = opts.get("num_cpus")
            out.append(Demand(d["name"], lo, hi, 1.0 if cpu is None else float(cpu), float(opts.get("num_gpus") or 0),
                              float(opts.get("memory") or 0), {k: float(v) for k, v in (opts.get("resources") or {}).items()},
                              d.get("max_replicas_per_node")))
    return out


def _eligible(d: Demand, g: GroupShape) -> bool:
    return (d.gpu == 0 or g.gpu > 0) and all(g.custom.get(k, 0) >= v for k, v in d.custom.items())


def _place(demands: list[Demand], groups: list[GroupShape], at: str, counts: dict[str, int],
           usage: dict[str, dict[str, float]] | None = None, last: str | None = None) -> dict[str, int]:
    """Pack ``counts[name]`` replicas of each deployment first-fit, largest first (deployment
    ``last`` after all others), onto the groups' pods at ``at`` ("min" or "max"); the replicas left
    over per deployment."""
    pods = [(g, {"cpu": g.cpu, "gpu": g.gpu, "memory": g.memory, **g.custom}, {})
            for g in groups for _ in range(g.min_pods if at == "min" else g.max_pods)]
    replicas = [d for d in demands for _ in range(counts.get(d.name, 0))]
    replicas.sort(key=lambda d: (d.name != last, d.gpu, d.cpu, d.memory), reverse=True)
    eps = 1e-9
    unplaced: dict[str, int] = {}
    for d in replicas:
        need = {"cpu": d.cpu, "gpu": d.gpu, "memory": d.memory, **d.custom}
        for g, free, count in pods:  # count: replicas per deployment on this pod (max_replicas_per_node)
            if (_eligible(d, g) and all(free.get(k, 0) + eps >= v for k, v in need.items())
                    and (d.per_pod is None or count.get(d.name, 0) < d.per_pod)):
                for k, v in need.items():
                    free[k] = free.get(k, 0) - v
                count[d.name] = count.get(d.name, 0) + 1
                if usage is not None:
                    used = usage.setdefault(g.name, {"cpu": 0.0, "gpu": 0.0, "replicas": 0})
                    used["cpu"] += d.cpu
                    used["gpu"] += d.gpu
                    used["replicas"] += 1
                break
        else:
            unplaced[d.name] = unplaced.get(d.name, 0) + 1
    return unplaced


def pack(demands: list[Demand], groups: list[GroupShape], at: str,
         usage: dict[str, dict[str, float]] | None = None) -> list[str]:
    """Errors for the replicas that do not fit (``at``: "min" or "max"); ``usage``, when given, is
    filled with what the placed replicas take per group (cpu, gpu, and the deployments).

    Greedy packing leaves over whichever replicas come last (the smallest), which need not be the
    deployment whose size broke the fit. So a failure is blamed first on the deployments that do not
    fit on their own — at minimum: its minimum replicas with nothing else; at maximum: its maximum
    with every other deployment at its minimum (the deployment that grew) — and only when none does
    on the replicas left over, which then do not fit *together with* the rest."""
    minimum = {d.name: d.min_replicas for d in demands}
    unplaced = _place(demands, groups, at, minimum if at == "min" else {d.name: d.max_replicas for d in demands}, usage)
    if not unplaced:
        return []
    alone = {}
    for d in demands:
        counts = {d.name: d.min_replicas} if at == "min" else {**minimum, d.name: d.max_replicas}
        if at == "min" or d.max_replicas > d.min_replicas:
            # d's own replicas left over once the others' minimum went first — and no order fits
            # (placing d last can fragment the pods: then the plain largest-first packing decides)
            left = _place(demands, groups, at, counts, last=d.name).get(d.name, 0)
            if left and _place(demands, groups, at, counts):
                alone[d.name] = left
    blamed, together = (alone, False) if alone else (unplaced, True)
    errors = []
    for d in demands:
        if d.name not in blamed:
            continue
        total = d.min_replicas if at == "min" else d.max_replicas
        usable = [g for g in groups if _eligible(d, g)]
        if not usable:
            errors.append(f"{d.name}: no worker group can hold its replicas ({d.describe()})")
            continue
        where = "; ".join(f"{CONFIG_KEYS.get(g.name, g.name)}: {g.min_pods if at == 'min' else g.max_pods} "
                          f"{g.describe()}" for g in usable)
        keys = " or ".join(f"{CONFIG_KEYS.get(g.name, g.name)}.{at}_replicas" for g in usable)
        context = ("together with the other deployments' replicas" if together else
                   "on their own" if at == "min" else "even with every other deployment at its minimum")
        errors.append(f"{d.name}: {blamed[d.name]} of its {total} replicas at {at}imum ({d.describe()}) do not fit "
                      f"the pods its worker groups have at {at}imum ({where}) {context}; raise {keys}, or give the "
                      f"deployment fewer or smaller replicas")
    return errors


def capacity(rayservice: dict[str, Any]) -> list[str]:
    """Every deployment's replicas fit the worker groups, at minimum and at maximum scale."""
    if rayservice.get("kind") != "RayService":
        return []
    demands = serve_demands(rayservice["spec"]["serveConfigV2"])
    groups = worker_groups(rayservice)
    return [f"capacity: {e}" for at in ("min", "max") for e in pack(demands, groups, at)]


def capacity_table(rayservice: dict[str, Any]) -> str:
    """Markdown: per worker group, its pods, CPUs and GPUs at minimum and maximum, and what the
    Serve replicas packed onto it take there (k8s/packing.md, re-rendered with the manifests)."""
    demands = serve_demands(rayservice["spec"]["serveConfigV2"])
    groups = worker_groups(rayservice)
    used: dict[str, dict[str, dict[str, float]]] = {"min": {}, "max": {}}
    for at in ("min", "max"):
        pack(demands, groups, at, used[at])
    lines = ["| group | pods min / max | CPUs min / max | GPUs min / max | replicas at min / max | "
             "CPUs they take at min / max | GPUs they take at min / max |", "|---|---|---|---|---|---|---|"]
    for g in groups:
        lo, hi = (used[at].get(g.name, {"cpu": 0.0, "gpu": 0.0, "replicas": 0}) for at in ("min", "max"))
        lines.append(f"| {g.name} | {g.min_pods} / {g.max_pods} | {g.min_pods * g.cpu:g} / {g.max_pods * g.cpu:g} | "
                     f"{g.min_pods * g.gpu:g} / {g.max_pods * g.gpu:g} | {lo['replicas']} / {hi['replicas']} | "
                     f"{lo['cpu']:g} / {hi['cpu']:g} | {lo['gpu']:g} / {hi['gpu']:g} |")
    return "\n".join(lines) + "\n"
