"""`bn-diff explain` through the real entry point: the forum case pinned at width 100 without
colour, reuse of the last `bn-diff run`, and one-line usage errors (exit 2).

Regenerate the snapshot with BN_DIFF_UPDATE_SNAPSHOTS=1.
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SNAPSHOTS = Path(__file__).parent / "snapshots"
sys.path.insert(0, str(EXAMPLES))


@dataclass
class Result:
    code: int
    out: str
    err: str


def bn_diff(*args: str, cwd: Path, columns: int = 300) -> Result:
    """`bn-diff ARGS` in-process through `bn_diff.cli.main`, in `cwd`, without colour."""
    from bn_diff.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env = Path.cwd(), dict(os.environ)
    os.environ.update(NO_COLOR="1", COLUMNS=str(columns))
    try:
        os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example files, as `examples/make_examples.py` makes them."""
    import make_examples

    out = tmp_path_factory.mktemp("examples")
    make_examples.main(out)
    return out


@pytest.fixture()
def cwd(tmp_path: Path, files: Path) -> Path:
    """A fresh working directory holding links to the example files."""
    for f in files.iterdir():
        (tmp_path / f.name).symlink_to(f)
    return tmp_path


def one_line_error(r: Result) -> str:
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2, (r.code, r.err, r.out)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err and r.out == ""
    return lines[0]


def normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


# --- the forum case ---------------------------------------------------------------------------
def test_snapshot_forum_case(cwd: Path) -> None:
    r = bn_diff("explain", "forum_model.pt", "forum_input.pt", "--layer", "bn", "--trust",
                cwd=cwd, columns=100)  # fmt: skip
    assert r.code == 0, r.err
    text = normalise(r.out)
    # reads naturally: batch statistics of channel 0, x̂, y, PyTorch agrees, γx+β listed
    parts = ("train mode", "mean_B", "var_B", "x̂", "γ·x̂ + β = y", "PyTorch agrees",
             "no normalization: weight and bias only", "running_mean[0]", "bn.eval()")  # fmt: skip
    for part in parts:
        assert part in text, part
    assert max(len(line) for line in text.splitlines()) <= 100
    path = SNAPSHOTS / "explain_forum.txt"
    if os.environ.get("BN_DIFF_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), "no snapshot yet: run with BN_DIFF_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(encoding="utf-8"), "explain output changed; diff, then regenerate"


def test_json_matches_terminal_numbers(cwd: Path) -> None:
    r = bn_diff("explain", "forum_model.pt", "forum_input.pt", "--layer", "bn", "--trust",
                "--index", "1,0,2,3", "--json", "-", cwd=cwd)  # fmt: skip
    assert r.code == 0, r.err
    js = json.loads(r.out)
    assert js["schema"] == "bn-diff/explain/v1" and js["ok"] is True
    assert js["element"]["index"] == [1, 0, 2, 3]
    assert js["layer"]["m"] == 4 * 8 * 8 and js["layer"]["mode"] == "train"
    assert js["alternatives"][0]["id"] == "no_normalization"
    assert js["alternatives"][0]["value"] == pytest.approx(0.8352 * js["element"]["x"], rel=1e-6)
    out = cwd / "explain.json"
    r2 = bn_diff("explain", "forum_model.pt", "forum_input.pt", "--layer", "bn", "--trust",
                 "--index", "1,0,2,3", "--json", str(out), cwd=cwd)  # fmt: skip
    assert r2.code == 0 and "Element (1, 0, 2, 3)" in r2.out
    assert json.loads(out.read_text()) == js


# --- reuse of the last run --------------------------------------------------------------------
def test_no_last_run(cwd: Path) -> None:
    line = one_line_error(bn_diff("explain", "--layer", "bn", cwd=cwd))
    assert "no earlier `bn-diff run` in this directory" in line


def test_reuses_last_run(cwd: Path) -> None:
    run = bn_diff("run", "forum_model.pt", "forum_input.pt", "--trust", cwd=cwd)
    assert run.code == 0, run.err
    rec = json.loads((cwd / ".bn-diff" / "last-run.json").read_text())
    assert rec["schema"] == "bn-diff/last-run/v1"
    assert rec["model"] == str(cwd / "forum_model.pt") and rec["trust"] is True
    # the permission to unpickle is not taken from a file
    assert "--trust" in one_line_error(bn_diff("explain", "--layer", "bn", cwd=cwd))
    again = bn_diff("explain", "--layer", "bn", "--trust", "--channel", "1", cwd=cwd)
    explicit = bn_diff("explain", "forum_model.pt", "forum_input.pt", "--layer", "bn", "--trust",
                       "--channel", "1", cwd=cwd)  # fmt: skip
    assert again.code == 0 and explicit.code == 0
    assert "reusing the last `bn-diff run` in this directory" in again.out
    body = [ln for ln in again.out.splitlines() if not ln.startswith("reusing")]
    assert body == explicit.out.splitlines()
    # options given now win over the recorded ones
    ev = json.loads(bn_diff("explain", "--layer", "bn", "--trust", "--mode", "eval", "--json", "-",
                            cwd=cwd).out)  # fmt: skip
    assert ev["layer"]["mode"] == "eval" and ev["layer"]["stats"] == "running"


def test_reuses_arch_pythonpath_and_synthetic_input(cwd: Path) -> None:
    args = ("small_cnn.safetensors", "--arch", "models:small_cnn", "--pythonpath", str(EXAMPLES))
    run = bn_diff("run", *args, "--input-shape", "2,3,8,8", "--seed", "5", cwd=cwd)
    assert run.code == 0, run.err
    reused = bn_diff("explain", "--layer", "bn2", "--index", "1,7,3,2", "--json", "-", cwd=cwd)
    explicit = bn_diff("explain", *args, "--input-shape", "2,3,8,8", "--seed", "5",
                       "--layer", "bn2", "--index", "1,7,3,2", "--json", "-", cwd=cwd)  # fmt: skip
    assert reused.code == 0, reused.err
    a, b = json.loads(reused.out), json.loads(explicit.out)
    assert a["input"] == "synthetic normal [2, 3, 8, 8], seed 5"
    assert a["layer"]["mode"] == "eval" and a["layer"]["shape"] == [2, 32, 4, 4]
    a.pop("model"), b.pop("model")
    assert a == b


def test_run_never_fails_on_unwritable_record(cwd: Path) -> None:
    (cwd / ".bn-diff").write_text("not a directory")
    run = bn_diff("run", "forum_model.pt", "forum_input.pt", "--trust", cwd=cwd)
    assert run.code == 0, run.err
    assert (cwd / ".bn-diff").read_text() == "not a directory"
    assert "cannot read" in one_line_error(bn_diff("explain", "--layer", "bn", cwd=cwd))


def test_corrupt_record(cwd: Path) -> None:
    (cwd / ".bn-diff").mkdir()
    (cwd / ".bn-diff" / "last-run.json").write_text("{not json")
    assert "not a record" in one_line_error(bn_diff("explain", "--layer", "bn", cwd=cwd))


# --- errors -----------------------------------------------------------------------------------
FORUM = ("explain", "forum_model.pt", "forum_input.pt", "--trust")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--layer", "bn1"), "did you mean bn?"),
        (("--layer", "BN"), "did you mean bn?"),
        (("--layer", "conv"), "'conv' is a Conv2d, not a BatchNorm layer"),
        (("--layer", "head"), "its BatchNorm layers: bn"),
        (("--layer", "bn#2"), "did not run"),
        (("--layer", "bn", "--index", "0,0,0"), "3 entries, but the layer's input (4, 2, 8, 8)"),
        (("--layer", "bn", "--index", "0,0,0,8"), "out of range on axis 3"),
        (("--layer", "bn", "--index", "4,0,0,0"), "out of range on axis 0"),
        (("--layer", "bn", "--index", "0,1,0,0", "--channel", "0"), "but --channel is 0"),
        (("--layer", "bn", "--channel", "2"), "--channel 2 is out of range"),
        (("--layer", "bn", "--index", "0,x"), "not a list of integers"),
    ],
)
def test_usage_errors_are_one_line(cwd: Path, args: tuple[str, ...], expected: str) -> None:
    line = one_line_error(bn_diff(*FORUM, *args, cwd=cwd))
    assert expected in line, line


def test_missing_input(cwd: Path) -> None:
    line = one_line_error(bn_diff("explain", "forum_model.pt", "--trust", "--layer", "bn", cwd=cwd))
    assert "missing INPUT" in line


TYPO_MODULE = """
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class EpsTypo(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.1, 1e-3)


def make():
    return nn.Sequential(OrderedDict(bn=EpsTypo(2))).eval()
"""


def test_disagreement_exits_1(tmp_path: Path) -> None:
    import torch

    (tmp_path / "typo_models.py").write_text(TYPO_MODULE)
    sd = {"bn.weight": torch.ones(2), "bn.bias": torch.zeros(2), "bn.running_mean": torch.zeros(2)}
    sd.update({"bn.running_var": torch.full((2,), 0.01), "bn.num_batches_tracked": torch.tensor(9)})
    torch.save(sd, tmp_path / "typo.pt")
    r = bn_diff("explain", "typo.pt", "--arch", "typo_models:make", "--pythonpath", str(tmp_path),
                "--input-shape", "2,2,3,3", "--layer", "bn", cwd=tmp_path)  # fmt: skip
    assert r.code == 1, r.err
    assert "✘ PyTorch disagrees" in r.out
    eps_line = next(ln for ln in r.out.splitlines() if "eps = 0.001 instead of 1e-05" in ln)
    after = r.out.split(eps_line, 1)[1].splitlines()[1]
    assert "= PyTorch's output here" in after
