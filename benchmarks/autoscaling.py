"""Autoscaling shown, not claimed: both levels, measured here, reaction times recorded.

    .venv/bin/python benchmarks/autoscaling.py serve    # Serve replicas of the encoder, up and down
    .venv/bin/python benchmarks/autoscaling.py nodes    # node scale-up with Ray's fake multi-node
                                                        # autoscaler, worker groups from k8s/
``serve``: a real local Serve app (small scifact index, base encoder) whose ExpertEncoder has an
``autoscaling_config`` (min 1, max 2, target 2 ongoing requests); ``/v1/embeddings`` load at a
fixed concurrency for ``--load-s`` seconds, then silence. ``serve.status()`` is polled: time from
load start until the 2nd replica RUNS, and from load end until it is gone.

``nodes``: ``ray.cluster_utils.AutoscalingCluster`` (the fake node provider Ray's own autoscaler
tests use; autoscaler v2) with one node type per worker group of ``k8s/rayservice.yaml`` (its
CPU/GPU per pod, min/max replicas) and a head with 0 CPUs as in the manifest. Demand: actors
sized like the GPU and CPU pods, more than the groups' minimum; time until every actor runs (the
nodes were launched for them), then, with the actors gone, until the cluster is back at the
minimum (``--idle-timeout-s``; the manifest's is ``k8s.idle_timeout_s``). It runs ``ray stop
--force`` (as AutoscalingCluster does): it refuses to start while another Ray cluster runs here.

Results: benchmarks/results/autoscaling.{json,md} (each part updates its own section).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
app = typer.Typer(add_completion=False, no_args_is_help=True)
OUT = RESULTS / "autoscaling"


def _save(section: str, data: dict) -> None:
    path = OUT.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[section] = {**data, "command": command_line(), "commit": git_commit(), "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Autoscaling, measured on this machine", ""]
    if "serve" in doc:
        s = doc["serve"]
        lines += [
            "## Serve replicas (ExpertEncoder, local Ray Serve app)", "",
            f"Command: `{s['command']}`; autoscaling_config `{json.dumps(s['autoscaling_config'])}`; "
            f"load: {s['concurrency']} concurrent `/v1/embeddings` requests for {s['load_s']} s.", "",
            "| event | seconds |", "|---|---|",
            f"| load start → 2nd replica RUNNING | {s['scale_up_s']} |",
            f"| load end → back to 1 replica | {s['scale_down_s']} |",
            f"| requests served during load (errors) | {s['requests']} ({s['errors']}) |", "",
        ]
    if "nodes" in doc:
        n = doc["nodes"]
        lines += [
            "## Nodes (Ray autoscaler v2, fake multi-node provider, groups from k8s/rayservice.yaml)", "",
            f"Command: `{n['command']}`; node types: "
            + ", ".join(f"{k} {v['resources']} min {v['min_workers']} max {v['max_workers']}" for k, v in n["node_types"].items())
            + f"; demand: {n['demand']}; idle timeout {n['idle_timeout_s']} s.", "",
            "| event | seconds |", "|---|---|",
            f"| cluster start → minimum worker nodes up | {n['boot_s']} |",
            f"| demand → every actor running (nodes {n['nodes_before']} → {n['nodes_peak']}) | {n['scale_up_s']} |",
            f"| demand gone → back to the minimum ({n['nodes_after']} nodes) | {n['scale_down_s']} |", "",
        ]
    OUT.with_suffix(".md").write_text("\n".join(lines))


# -- Serve replica autoscaling --------------------------------------------------------------------


def _running(serve, app_name: str, deployment: str) -> int:
    status = serve.status().applications[app_name].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


@app.command("serve")
def serve_replicas(
    load_s: float = typer.Option(60.0, help="seconds of load"),
    concurrency: int = typer.Option(12),
    max_wait_s: float = typer.Option(180.0, help="give up waiting for a scale event after this"),
):
    from ray import serve
    from rich.console import Console

    from serve.app.builders import build_app

    from serve.app.settings import ENCODER
    from serve.cli.common import wait_healthy
    from serve.deploy.cluster import ensure_ray
    from serve.config import RayConfig, config_from_dict, load_config
    from serve.offline.indexing import build_index

    console = Console()
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                   "upscale_delay_s": 2.0, "downscale_delay_s": 10.0}
    work = Path(tempfile.mkdtemp(prefix="autoscale-"))
    base = load_config(REPO / "configs" / "local.yaml").model_dump(mode="json")
    base.update(corpus={"datasets": ["scifact"], "max_docs_per_dataset": 200},
                experts={"dir": None, "training": {"default_domains": []}})
    base["index"].update(dir=str(work / "index"), num_shards=1, encode_workers=1)
    base["llm"]["enabled"] = False
    base["http"]["port"] = 8011
    base["deployments"]["encoder"] = {"max_ongoing_requests": 8, "autoscaling_config": autoscaling,
                                      "ray_actor_options": {"num_cpus": 1}}
    cfg = config_from_dict(base)
    data_dir = cfg.resolve_data_dir()
    ensure_ray(RayConfig(num_cpus=4))
    build_index(cfg, data_dir, progress=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8011})
    serve.run(build_app({"config": cfg, "data_dir": str(data_dir)}), name="scale", route_prefix="/")
    url = "http://127.0.0.1:8011"
    wait_healthy(url, 120)
    timeline: list[tuple[float, int]] = []

    async def drive() -> dict:
        import httpx

        stop = asyncio.Event()
        counts = {"ok": 0, "err": 0}
        text = "Vitamin D supplementation and the risk of acute respiratory infection in adults. " * 4

        async def worker(client):
            while not stop.is_set():
                r = await client.post(f"{url}/v1/embeddings", json={"model": "base", "input": [text] * 8})
                counts["ok" if r.status_code == 200 else "err"] += 1

        t0 = time.monotonic()
        up = down = None
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
            while time.monotonic() - t0 < max(load_s, 1):
                n = await asyncio.to_thread(_running, serve, "scale", ENCODER)
                timeline.append((round(time.monotonic() - t0, 1), n))
                if up is None and n >= 2:
                    up = time.monotonic() - t0
                    console.print(f"2nd replica running after {up:.1f} s of load")
                await asyncio.sleep(0.5)
            if up is None:  # keep loading until the scale-up shows (bounded)
                while up is None and time.monotonic() - t0 < max_wait_s:
                    n = await asyncio.to_thread(_running, serve, "scale", ENCODER)
                    timeline.append((round(time.monotonic() - t0, 1), n))
                    if n >= 2:
                        up = time.monotonic() - t0
                    await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
        t1 = time.monotonic()
        console.print("load stopped; waiting for the scale-down")
        while time.monotonic() - t1 < max_wait_s:
            n = await asyncio.to_thread(_running, serve, "scale", ENCODER)
            timeline.append((round(time.monotonic() - t0, 1), n))
            if n <= 1:
                down = time.monotonic() - t1
                break
            await asyncio.sleep(0.5)
        return {"scale_up_s": None if up is None else round(up, 1), "scale_down_s": None if down is None else round(down, 1),
                "requests": counts["ok"], "errors": counts["err"], "load_s_actual": round(t1 - t0, 1)}

    try:
        result = asyncio.run(drive())
    finally:
        serve.shutdown()
    result.update(autoscaling_config=autoscaling, concurrency=concurrency, load_s=load_s,
                  timeline=[{"t_s": t, "running": n} for t, n in timeline])
    _save("serve", result)
    console.print({k: v for k, v in result.items() if k != "timeline"})


# -- node autoscaling -----------------------------------------------------------------------------


def node_types_from_manifest(manifest: Path) -> dict[str, dict]:
    """Autoscaler node types, one per worker group: its pods' CPU/GPU, min/max replicas."""
    doc = next(d for d in yaml.safe_load_all(manifest.read_text()) if d and d.get("kind") == "RayService")
    types = {}
    for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": int(float(str(limits["cpu"]).rstrip("m")) / (1000 if str(limits["cpu"]).endswith("m") else 1)),
                     "object_store_memory": 100 * 1024 * 1024}  # fake nodes are local raylets: keep stores small
        if "nvidia.com/gpu" in limits:
            resources["GPU"] = int(limits["nvidia.com/gpu"])
        types[f"ray.worker.{g['groupName']}"] = {"resources": resources, "node_config": {},
                                                 "min_workers": g["minReplicas"], "max_workers": g["maxReplicas"]}
    return types


def _fake_cluster_config(head_resources: dict, worker_types: dict, idle_timeout_s: float) -> dict:
    """The fake multi-node provider's cluster config (Ray's wheel does not ship the example.yaml
    AutoscalingCluster reads, so it is given here)."""
    return {
        "cluster_name": "routerserve-fake",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {**copy.deepcopy(worker_types),
                                 "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_s / 60.0, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _ray_running() -> bool:
    out = subprocess.run([sys.executable, "-c", "import ray; print(len(ray._private.services.find_gcs_addresses()))"],
                         capture_output=True, text=True)
    return out.stdout.strip() != "0"


@app.command("nodes")
def nodes(
    manifest: Path = typer.Option(REPO / "k8s" / "rayservice.yaml"),
    gpu_actors: int = typer.Option(3, help="actors sized like a GPU pod (the group's minimum is 1)"),
    cpu_actors: int = typer.Option(2, help="actors sized like a CPU pod"),
    idle_timeout_s: float = typer.Option(30.0, help="shorter than the manifest's, to keep the run short"),
    max_wait_s: float = typer.Option(300.0),
    force: bool = typer.Option(False, help="run even though another Ray cluster runs here (it will be stopped)"),
):
    import ray
    from ray.cluster_utils import AutoscalingCluster
    from rich.console import Console

    console = Console()
    if _ray_running() and not force:
        console.print("[red]a Ray cluster runs on this machine; this benchmark runs `ray stop --force`. "
                      "Stop it first or pass --force.[/red]")
        raise typer.Exit(2)
    worker_types = node_types_from_manifest(manifest)
    head = {"CPU": 0}

    class _Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
            cfg = _fake_cluster_config(head_resources, worker_node_types, idle_timeout_s)
            if autoscaler_v2:
                from ray.cluster_utils import FAKE_HEAD_NODE_ID

                cfg["provider"]["launch_multiple"] = True
                cfg["provider"]["head_node_id"] = FAKE_HEAD_NODE_ID
            return cfg

    # AutoscalingCluster runs the `ray` CLI: the one of this interpreter's environment
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = _Cluster(head_resources=dict(head), worker_node_types=worker_types, autoscaler_v2=True)
    # Ray 2.60.0's wheel omits fake_multi_node/example.yaml, which the autoscaler monitor also
    # reads as the fake provider's defaults (FileNotFoundError in monitor.err, no node ever
    # launches). Write our own config there when it is missing.
    defaults = Path(ray.__file__).parent / "autoscaler" / "_private" / "fake_multi_node" / "example.yaml"
    if not defaults.is_file():
        defaults.write_text(yaml.safe_dump(_fake_cluster_config({"CPU": 0}, worker_types, idle_timeout_s)))
        console.print(f"wrote the missing fake-provider defaults {defaults}")
    minimum = 1 + sum(t["min_workers"] for t in worker_types.values())
    gpu_type = next(t for t in worker_types.values() if "GPU" in t["resources"])
    cpu_type = next(t for t in worker_types.values() if "GPU" not in t["resources"])

    def alive() -> int:
        return sum(1 for n in ray.nodes() if n["Alive"])

    t_start = time.monotonic()
    cluster.start()
    try:
        ray.init("auto")
        while alive() < minimum and time.monotonic() - t_start < max_wait_s:
            time.sleep(0.5)
        boot = time.monotonic() - t_start
        before = alive()
        console.print(f"{before} nodes up (minimum {minimum}) after {boot:.1f} s")

        @ray.remote
        class Sized:
            def ping(self) -> str:
                return ray.get_runtime_context().get_node_id()

        actors = [Sized.options(num_cpus=gpu_type["resources"]["CPU"], num_gpus=gpu_type["resources"]["GPU"]).remote()
                  for _ in range(gpu_actors)]
        actors += [Sized.options(num_cpus=cpu_type["resources"]["CPU"]).remote() for _ in range(cpu_actors)]
        t0 = time.monotonic()
        placed = ray.get([a.ping.remote() for a in actors], timeout=max_wait_s)
        up = time.monotonic() - t0
        peak = alive()
        console.print(f"all {len(actors)} actors running on {len(set(placed))} nodes after {up:.1f} s ({before} → {peak} nodes)")
        for a in actors:
            ray.kill(a)
        t1 = time.monotonic()
        down = None
        while time.monotonic() - t1 < max_wait_s + idle_timeout_s:
            if alive() <= minimum:
                down = time.monotonic() - t1
                break
            time.sleep(1.0)
        after = alive()
        console.print(f"back to {after} nodes after {down} s")
    finally:
        ray.shutdown()
        cluster.shutdown()
    _save("nodes", {
        "node_types": worker_types, "head": head, "autoscaler": "v2",
        "demand": (f"{gpu_actors} actors of {{'CPU': {gpu_type['resources']['CPU']}, 'GPU': {gpu_type['resources']['GPU']}}}"
                   f" + {cpu_actors} of {{'CPU': {cpu_type['resources']['CPU']}}}"),
        "idle_timeout_s": idle_timeout_s, "boot_s": round(boot, 1), "nodes_before": before, "nodes_peak": peak,
        "scale_up_s": round(up, 1), "nodes_after": after, "scale_down_s": None if down is None else round(down, 1),
    })


if __name__ == "__main__":
    app()
