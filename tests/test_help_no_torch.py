"""`bn-diff --help` and `bn-diff layers --help` stay instant: they never import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from bn_diff.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["layers", "--help"], ["run", "--help"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    probe = json.loads(out.stderr.strip().splitlines()[-1])
    assert probe["code"] == 0, out.stderr
    assert "Usage" in out.stdout + out.stderr
    assert probe["torch"] is False


def test_the_probe_can_see_torch() -> None:
    """The same probe on a command that needs torch reports it: the test above can fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "layers", str(ROOT / "no-such-model.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert json.loads(out.stderr.strip().splitlines()[-1])["torch"] is True
