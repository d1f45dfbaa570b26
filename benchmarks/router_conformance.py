"""Router-R1 conformance: run the golden-trace suite (tests/actors/test_router_r1_conformance.py,
cases in tests/actors/golden/router_r1.yaml) and write what passed, by area.

    .venv/bin/python benchmarks/router_conformance.py

Writes benchmarks/results/router_conformance.{json,md}: {"cases": N, "passed": N, "by_area": {…},
"failed": [ids]} with the command, commit and machine. Exits 1 when a case fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, git_commit, machine, write_json, write_markdown  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUITE = "tests/actors/test_router_r1_conformance.py"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", SUITE, "-k", "test_golden_trace", f"--junitxml={report}"],
                       cwd=REPO, check=False)
        cases = ET.parse(report).getroot().iter("testcase")
        outcomes = {}
        for case in cases:
            area_id = case.get("name").split("[", 1)[1].rstrip("]")  # test_golden_trace[area:id]
            outcomes[area_id] = not any(child.tag in ("failure", "error", "skipped") for child in case)
    by_area: dict[str, dict[str, int]] = {}
    for area_id, ok in outcomes.items():
        row = by_area.setdefault(area_id.split(":", 1)[0], {"cases": 0, "passed": 0})
        row["cases"] += 1
        row["passed"] += ok
    result = {"cases": len(outcomes), "passed": sum(outcomes.values()), "by_area": by_area,
              "failed": sorted(k for k, ok in outcomes.items() if not ok),
              "suite": f"{SUITE} (golden traces: tests/actors/golden/router_r1.yaml)",
              "command": command_line(), "commit": git_commit(), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json("router_conformance", result)
    lines = ["# Router-R1 conformance (golden traces)", "",
             f"Command: `{result['command']}` (commit {result['commit']}, {result['date']}). Each case replays scripted "
             "router generations through the real loop and checks the exact prompt before every generation, the "
             "observations, actions, turns, stop reason and ledger.", "",
             "| area | cases | passed |", "|---|---|---|"]
    lines += [f"| {area} | {row['cases']} | {row['passed']} |" for area, row in sorted(by_area.items())]
    lines += [f"| **all** | {result['cases']} | {result['passed']} |", ""]
    if result["failed"]:
        lines += ["Failed: " + ", ".join(f"`{f}`" for f in result["failed"]), ""]
    write_markdown("router_conformance", "\n".join(lines))
    print(f"{result['passed']}/{result['cases']} golden cases passed; wrote benchmarks/results/router_conformance.json/.md")
    return 0 if result["passed"] == result["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
