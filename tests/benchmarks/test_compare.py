"""benchmarks/compare.py: its arithmetic on recorded requests, and a smoke run of the whole
comparison (a real `routerserve up`, the naive server, the in-process ceiling) on a small
config, so the benchmark cannot rot. Nothing about performance is asserted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_summaries_count_only_the_measured_window_and_goodput_within_the_slo():
    from compare import ratios, summarize
    from reliability_common import Record

    recs = [Record(0.2, 0.1, 200, False, False),  # warm-up: not counted
            Record(1.0, 0.1, 200, False, False), Record(1.5, 0.3, 200, False, False),
            Record(2.0, 2.0, 200, False, False), Record(2.5, 0.1, 503, True, True),
            Record(3.5, 0.1, 200, False, False)]  # started after the window
    s = summarize(recs, warmup_s=1.0, duration_s=3.0, slo_s=1.0)
    assert (s["requests"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["qps"] == pytest.approx(1.5) and s["goodput"] == pytest.approx(1.0)
    assert s["completed_per_s"] == pytest.approx(1.0)  # the 2 s answer finished after the window
    assert s["p50_ms"] == pytest.approx(300.0)
    doc = {"systems": {"ceiling": {"qps": 100.0},
                       "routerserve": {"cold_start_s": 42.0, "closed": {"32": {"qps": 60.0, "p50_ms": 100.0, "p99_ms": 250.0}}},
                       "naive": {"closed": {"32": {"qps": 30.0}}}, "serve-batch": {"closed": {"32": {"qps": 40.0}}},
                       "default-app": {"cold_start_s": 90.0}}}
    r = ratios(doc, "32")
    assert r["vs_serve_batch_c32"] == pytest.approx(1.5) and r["default_app_cold_start_s"] == 90.0
    assert r["ceiling_share_c32"] == pytest.approx(0.6) and r["vs_naive_c32"] == pytest.approx(2.0)
    assert r["p99_over_p50_c32"] == pytest.approx(2.5) and r["cold_start_s"] == 42.0 and r["vs_infinity_c32"] is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_the_comparison_runs_end_to_end_in_smoke_mode(tmp_path, data_dir):
    """One command from a clean state: `routerserve up` first builds the small index and trains
    two experts and serves /v1/retrieve, /v1/embeddings and the mixed-expert load (one service),
    then the same app with Ray Serve's @serve.batch, the ceiling and the naive server run on the
    same artifacts; the JSON, markdown and PNG are written where asked, with every system's
    figures."""
    out = tmp_path / "out"
    sets = [f"index.dir={tmp_path / 'index'}", f"experts.dir={tmp_path / 'experts'}", "corpus.max_docs_per_dataset=120",
            "index.chunk_size=64", "index.encode_workers=1", "model.max_seq_length=128",
            "corpus.datasets=[scifact,nfcorpus]", "experts.training.default_domains=[scifact,nfcorpus]",
            "experts.training.steps=4", "experts.training.max_queries=24",
            "experts.training.batch_size=8", f"data_dir={data_dir}"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "compare.py"), "--smoke",
           "--systems", "routerserve,embeddings,mixed,serve-batch,ceiling,naive", "--out", str(out), "--port", str(_free_port()), "--naive-port", str(_free_port())]
    for s in sets:
        cmd += ["--set", s]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    # `up` stops on SIGTERM as on Ctrl-C (Serve shut down, exit 0), also where SIGINT is ignored
    assert run.stdout.count("[service] stopped (exit 0)") == 2, run.stdout[-3000:]
    doc = json.loads((out / "compare.json").read_text())
    assert set(doc["systems"]) == {"routerserve", "ceiling", "naive", "embeddings", "mixed", "serve-batch"} and doc["smoke"] is True
    assert all(doc["systems"]["embeddings"]["closed"][c]["qps"] > 0 for c in ("1", "4"))
    for name in ("routerserve", "serve-batch", "naive"):
        closed = doc["systems"][name]["closed"]
        assert set(closed) == {"1", "4"} and all(c["qps"] > 0 for c in closed.values()), (name, closed)
        assert doc["systems"][name]["open"]["4"]["ok"] > 0
    assert doc["systems"]["ceiling"]["qps"] > 0 and doc["ratios"]["cold_start_s"] > 0
    assert doc["ratios"]["ceiling_share_c4"] is not None and doc["ratios"]["vs_naive_c4"] is not None
    assert doc["ratios"]["mixed_vs_single"] is not None  # 2 experts: scifact and nfcorpus
    assert doc["ratios"]["vs_serve_batch_c4"] is not None and doc["systems"]["serve-batch"]["cold_start_s"] > 0
    # one `routerserve up` served the three adjacent systems (a restart truncates the log)
    log = (out / "logs" / "compare_routerserve.log").read_text()
    assert "POST /v1/embeddings 200" in log and "GET /v1/experts 200" in log and log.count("Ctrl-C to stop.") == 1
    assert "## Closed loop" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 0
