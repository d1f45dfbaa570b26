"""The architecture contracts (import-linter, in pyproject.toml) hold, and they do catch violations:
each deliberate bad import below, added to a copy of the packages, breaks the contract it should."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache", "--no-logo"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def copy_of_packages(tmp_path) -> Path:
    for name in ("serve", "actors"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold_for_the_tree():
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the online app reaching the training code through another module
        ("serve/app/retrieval/_violation.py", "import serve.offline.training\n", "never imports the offline pipelines"),
        ("serve/app/_violation.py", "from actors import expert_training\n", "never imports the offline pipelines"),
        # a lower layer importing a higher one (function-local imports count)
        ("actors/_violation.py", "def f():\n    import serve.config\n", "a layer imports only lower ones"),
        ("serve/artifacts/_violation.py", "from serve.offline import ir\n", "a layer imports only lower ones"),
        # a cycle inside one package: ir -> indexing already; indexing -> ir closes it
        ("serve/offline/indexing.py", "\n\ndef _cycle():\n    from . import ir\n", "no import cycles"),
    ],
)
def test_a_violating_import_breaks_its_contract(copy_of_packages, module, line, broken):
    path = copy_of_packages / module
    path.write_text((path.read_text() if path.exists() else "") + line)
    out = lint(copy_of_packages)
    assert out.returncode != 0, out.stdout
    assert broken in " ".join(out.stdout.split()), out.stdout
