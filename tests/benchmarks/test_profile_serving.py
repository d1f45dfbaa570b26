"""benchmarks/profile_serving.py: folding py-spy's collapsed stacks and naming Ray's processes."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_fold_counts_self_samples_our_functions_and_packages_once_per_stack():
    from profile_serving import fold

    raw = ("_bootstrap (threading.py:1002);embed_requests (actors/routed_encoder.py:129);"
           "encode (actors/encoder.py:120);encode (actors/encoder.py:121);forward (torch/nn/modules/linear.py:125) 30\n"
           "_bootstrap (threading.py:1002);main_loop (ray/_private/worker.py:900) 10\n"
           "not a stack line\n")
    prof = fold(raw)
    assert prof["samples"] == 40
    assert prof["self"][0] == ("forward (torch/nn/modules/linear.py)", 30)
    # one function on two lines of one stack counts once; library frames are not "ours"
    assert dict(prof["inclusive_ours"]) == {"embed_requests (actors/routed_encoder.py)": 30, "encode (actors/encoder.py)": 30}
    assert dict(prof["packages"]) == {"threading": 1.0, "actors": 0.75, "torch": 0.75, "ray": 0.25}


def test_roles_of_ray_processes():
    from profile_serving import role

    assert role("ray::ServeReplica:routerserve:ExpertEncoder.handle_request") == "ExpertEncoder"
    assert role("ray::ProxyActor") == "HTTP proxy"
    assert role("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x") == "raylet"
