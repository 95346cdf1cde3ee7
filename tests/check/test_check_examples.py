"""The CI examples run: the script the workflow calls, and the pytest example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from check_helpers import REPO

CI = REPO / "examples" / "ci"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("GITHUB_ACTIONS", None)
    return env


def test_workflow_runs_the_scripts_that_exist() -> None:
    text = (CI / "bn-diff-check.yml").read_text()
    paths = set(re.findall(r"examples/ci/[\w.-]+", text))
    assert paths == {"examples/ci/check_export.sh", "examples/ci/test_bn_export.py"}
    assert all((REPO / p).exists() for p in paths)
    assert "'.[onnx]'" in text  # the extra the ONNX backend needs


def test_check_export_script_passes_and_writes_reports(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(CI / "check_export.sh"), str(tmp_path / "out")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "✔ check passed: all 17 BatchNorm layers (17 folded into convs)" in proc.stdout
    doc = json.loads((tmp_path / "out" / "bn-diff.json").read_text())
    assert doc["ok"] and doc["summary"]["folded_conv"] == 17
    assert (tmp_path / "out" / "bn-diff-junit.xml").read_text().count("<testcase") == 19


def test_pytest_example_passes() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(CI / "test_bn_export.py"),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
