"""Fuzz: schemathesis (`--checks all`) against the /openapi.json a real `routerserve up` serves.

    .venv/bin/python benchmarks/fuzz.py [--max-examples 400]

The service runs with the LLM half off (its endpoints are fuzzed in CI over scripted engines:
tests/serve/app/test_api_contract.py). schemathesis generates valid and invalid requests from
the published spec (examples, coverage and fuzzing phases) and applies every built-in check:
no 5xx, every status and header documented, responses matching their schemas, schema-valid
requests accepted, schema-violating ones rejected, 405 with Allow. The project's
benchmarks/schemathesis.toml is used (it changes one check for one operation; it says why).
Every exchange is read back from schemathesis' HAR report: cases, 5xx answers, 4xx answers whose
body is not our JSON error with a message.

Writes the "fuzz" section of benchmarks/results/reliability.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_common import OUT, REPO, RETRIEVAL_ONLY, LiveService, save_section  # noqa: E402

app = typer.Typer(add_completion=False)


def _is_json_error(text: str) -> bool:
    try:
        return bool(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return False


@app.command()
def main(
    max_examples: int = typer.Option(400, help="schemathesis --max-examples (per operation and phase)"),
    seed: int = typer.Option(13),
):
    har = OUT.parent / "fuzz.har.json"
    junit = OUT.parent / "fuzz.junit.xml"
    with LiveService(RETRIEVAL_ONLY, OUT.parent / "logs" / "fuzz_service.log") as service:
        cmd = [str(REPO / ".venv/bin/schemathesis"), "--config-file", str(REPO / "benchmarks/schemathesis.toml"), "run",
               f"{service.url}/openapi.json", "--checks", "all", "--workers", "1", "--request-timeout", "60",
               "--max-examples", str(max_examples), "--seed", str(seed),
               "--report", "har,junit", "--report-har-path", str(har), "--report-junit-path", str(junit)]
        print("[fuzz] " + " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false",
                                                                      "NO_COLOR": "1"})
        print(done.stdout[-3000:], flush=True)
        spec = httpx.get(f"{service.url}/openapi.json", timeout=30).json()
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = [e["response"]["status"] for e in entries]
    non_json_4xx = sum(400 <= e["response"]["status"] < 500 and not _is_json_error(e["response"]["content"].get("text", ""))
                       for e in entries)
    failures = 0
    import xml.etree.ElementTree as ET

    for case in ET.parse(junit).getroot().iter("testcase"):
        failures += len(case.findall("failure")) + len(case.findall("error"))
    operations = [f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops]
    by_status = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    section = {
        "cases": len(entries),
        "server_errors": sum(s >= 500 for s in statuses),
        "non_json_4xx": non_json_4xx,
        "check_failures": failures,
        "schemathesis_exit_code": done.returncode,
        "by_status": by_status,
        "operations": operations,
        "max_examples": max_examples,
        "seed": seed,
        "setup": "LLM half off; schemathesis 4.32.5 --checks all, benchmarks/schemathesis.toml; one worker",
    }
    save_section("fuzz", section)
    for name in (har, junit):  # large and regenerated each run: kept out of the results folder
        name.unlink(missing_ok=True)
    print(f"[fuzz] {section['cases']} cases, statuses {by_status}, server errors {section['server_errors']}, "
          f"non-JSON 4xx {non_json_4xx}, check failures {failures}")
    print(f"wrote {OUT}.json/.md")


if __name__ == "__main__":
    app()
