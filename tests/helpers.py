"""Test helpers: paths, and running the real CLI in-process."""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

os.environ.setdefault("OMP_NUM_THREADS", "2")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def cli(*args: str, cwd: Path | None = None, columns: int = 200) -> CliResult:
    """Run `bn-diff ARGS` in-process through the real entry point (bn_diff.cli.main).

    No colour, and a wide terminal so that content assertions do not depend on line wrapping.
    """
    from bn_diff.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    env_before = os.environ.get("NO_COLOR")
    cols_before = os.environ.get("COLUMNS")
    os.environ["NO_COLOR"] = "1"
    os.environ["COLUMNS"] = str(columns)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        os.chdir(old)
        if env_before is None:
            os.environ.pop("NO_COLOR", None)
        if cols_before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = cols_before
    return CliResult(code, out.getvalue(), err.getvalue())
