"""The real entry point: every exit code, clean JSON on stdout, one-line errors, schema v1."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from helpers import ROOT, cli

SCHEMA = json.loads((ROOT / "bn_diff" / "schemas" / "run-v1.json").read_text())


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _one_line_error(err: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_demo_forum_case_exit_0(example_files: Path) -> None:
    r = cli(
        "run",
        str(example_files / "forum_model.pt"),
        str(example_files / "forum_input.pt"),
        "--trust",
    )
    assert r.code == 0, r.err
    assert "train" in r.out and "batch" in r.out
    assert "in eval mode its output would move by up to" in r.out


def test_state_dict_with_arch_and_json_schema(example_files: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    files = [example_files / "small_cnn.safetensors", example_files / "cnn_input.npy"]
    before = [_digest(p) for p in files]
    r = cli(
        "run",
        *map(str, files),
        "--arch",
        "models:small_cnn",
        "--pythonpath",
        str(ROOT / "examples"),
        "--json",
        str(out),
    )
    assert r.code == 0, r.err
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["ok"] is True and [lr["name"] for lr in doc["layers"]] == ["bn1", "bn2", "bn3"]
    assert all(lr["mode"] == "eval" and lr["stats"] == "running" for lr in doc["layers"])
    assert [lr["producer"] for lr in doc["layers"]] == ["conv1", "conv2", "conv3"]
    assert [_digest(p) for p in files] == before, "bn-diff must never write to its inputs"


def test_json_to_stdout_is_clean(example_files: Path) -> None:
    r = cli(
        "run",
        str(example_files / "small_cnn.pt"),
        str(example_files / "cnn_input.npy"),
        "--arch",
        "models:small_cnn",
        "--pythonpath",
        str(ROOT / "examples"),
        "--json",
        "-",
    )
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    jsonschema.validate(doc, SCHEMA)


def test_mismatch_exit_1(tmp_path: Path) -> None:
    mod = tmp_path / "faulty_models.py"
    mod.write_text(
        "import torch, torch.nn as nn, torch.nn.functional as F\n"
        "class BadBN(nn.BatchNorm2d):\n"
        "    def forward(self, x):\n"
        "        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,"
        " False, 0.1, 1e-2)\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(3, 4, 1), BadBN(4)).eval()\n"
        "    m[1].running_var.fill_(0.05)\n"
        "    return m\n"
    )
    sys.path.insert(0, str(tmp_path))
    import faulty_models

    torch.save(faulty_models.net().state_dict(), tmp_path / "w.pt")
    np.save(
        tmp_path / "x.npy", np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    )
    r = cli(
        "run",
        str(tmp_path / "w.pt"),
        str(tmp_path / "x.npy"),
        "--arch",
        "faulty_models:net",
        "--pythonpath",
        str(tmp_path),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert r.code == 1, r.err
    assert "MISMATCH" in r.out and "Mismatched elements:" in r.out
    assert "Greatest absolute difference:" in r.out and "Minimum tolerance that would pass" in r.out
    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["ok"] is False and doc["layers"][0]["mismatched"] > 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--atol", "1e-3"], "--atol and --rtol go together"),
        (["--mode", "sideways"], ""),
        (["--layer", "bn9"], "did you mean"),
        (["--input-shape", "2,3,8,8"], "give INPUT or --input-shape, not both"),
    ],
)
def test_usage_errors_exit_2(example_files: Path, args: list[str], needle: str) -> None:
    r = cli(
        "run",
        str(example_files / "small_cnn.pt"),
        str(example_files / "cnn_input.npy"),
        "--arch",
        "models:small_cnn",
        "--pythonpath",
        str(ROOT / "examples"),
        *args,
    )
    assert r.code == 2, (r.out, r.err)
    assert "Traceback" not in r.err
    assert needle in r.err


def test_bad_input_shape_exit_2(example_files: Path) -> None:
    r = cli("run", str(example_files / "forum_model.pt"), "--input-shape", "2,x", "--trust")
    assert r.code == 2
    _one_line_error(r.err)
    assert "not a list of integers" in r.err


def test_state_dict_without_arch_is_usage_error(example_files: Path) -> None:
    r = cli("run", str(example_files / "small_cnn.pt"), str(example_files / "cnn_input.npy"))
    assert r.code == 2
    _one_line_error(r.err)
    assert "state_dict" in r.err and "--arch" in r.err


def test_pickled_module_refused_without_trust(example_files: Path) -> None:
    r = cli("run", str(example_files / "forum_model.pt"), str(example_files / "forum_input.pt"))
    assert r.code == 3
    _one_line_error(r.err)
    assert "can run code" in r.err and "Sequential" in r.err and "--trust" in r.err


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "truncated", "wrong_content"])
def test_unreadable_input_exit_3(example_files: Path, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "x.pt"
    if kind == "directory":
        target.mkdir()
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        data = (example_files / "forum_input.pt").read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "wrong_content":
        torch.save({"not": "a tensor", "n": 3}, target)
    r = cli("run", str(example_files / "forum_model.pt"), str(target), "--trust")
    assert r.code == 3, (r.out, r.err)
    _one_line_error(r.err)


def test_wrong_channels_says_what_first_layer_expects(example_files: Path) -> None:
    r = cli("run", str(example_files / "forum_model.pt"), "--input-shape", "2,5,8,8", "--trust")
    assert r.code == 3
    _one_line_error(r.err)
    assert "expects 3 input channels" in r.err


def test_batch_of_one_in_train_mode_explained(example_files: Path) -> None:
    r = cli("run", str(example_files / "forum_model.pt"), "--input-shape", "1,3,1,1", "--trust")
    assert r.code == 3
    _one_line_error(r.err)
    assert "one value per channel" in r.err and "--mode eval" in r.err
    r = cli(
        "run",
        str(example_files / "forum_model.pt"),
        "--input-shape",
        "1,3,1,1",
        "--trust",
        "--mode",
        "eval",
    )
    assert r.code == 0, r.err


def test_nan_input_warns_and_still_reports(example_files: Path, tmp_path: Path) -> None:
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    r = cli("run", str(example_files / "forum_model.pt"), str(tmp_path / "nan.pt"), "--trust")
    assert r.code == 0, r.err
    assert "nonfinite_input" in r.out


def test_model_without_bn_says_so(tmp_path: Path) -> None:
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), tmp_path / "m.pt")
    torch.save(torch.randn(2, 3), tmp_path / "x.pt")
    r = cli("run", str(tmp_path / "m.pt"), str(tmp_path / "x.pt"), "--trust")
    assert r.code == 0
    assert "no BatchNorm layers" in r.out


def test_internal_error_exit_4_with_traceback(
    example_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bn_diff.pipeline as pipeline

    def boom(*_a: object, **_k: object) -> None:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(pipeline, "check_call", boom)
    r = cli(
        "run",
        str(example_files / "forum_model.pt"),
        str(example_files / "forum_input.pt"),
        "--trust",
    )
    assert r.code == 4
    assert "Traceback" in r.err and "simulated bug" in r.err and "internal error" in r.err


def test_layers_command(example_files: Path) -> None:
    r = cli(
        "layers",
        str(example_files / "small_cnn.safetensors"),
        "--arch",
        "models:small_cnn",
        "--pythonpath",
        str(ROOT / "examples"),
    )
    assert r.code == 0, r.err
    for name in ("conv1", "bn1", "conv3", "bn3"):
        assert name in r.out
    assert "groups=32" in r.out and "3 BatchNorm layers (0 in train mode)" in r.out


def test_layer_glob_shows_channel_table(example_files: Path) -> None:
    r = cli(
        "run",
        str(example_files / "small_cnn.pt"),
        str(example_files / "cnn_input.npy"),
        "--arch",
        "models:small_cnn",
        "--pythonpath",
        str(ROOT / "examples"),
        "--layer",
        "bn2",
    )
    assert r.code == 0
    assert "batch mean" in r.out and "bn1" not in r.out
    assert "more channels not shown" in r.out


def test_python_m_entry_point_subprocess(example_files: Path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_diff",
            "run",
            str(example_files / "forum_model.pt"),
            str(example_files / "forum_input.pt"),
            "--trust",
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["schema"] == "bn-diff/run/v1"


def test_trusted_pickle_of_custom_class_needs_its_module(tmp_path: Path) -> None:
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "mynet.py").write_text(
        "import torch.nn as nn\n"
        "class MyNet(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.bn = nn.BatchNorm1d(4)\n"
        "    def forward(self, x):\n"
        "        return self.bn(x)\n"
    )
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import mynet; "
        "torch.save(mynet.MyNet().eval(), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(pkg), str(tmp_path / "m.pt")], check=True)
    torch.save(torch.randn(3, 4), tmp_path / "x.pt")
    r = cli("run", str(tmp_path / "m.pt"), str(tmp_path / "x.pt"))
    assert r.code == 3 and "mynet.MyNet" in r.err
    r = cli("run", str(tmp_path / "m.pt"), str(tmp_path / "x.pt"), "--trust")
    assert r.code == 3 and "--pythonpath" in r.err
    _one_line_error(r.err)
    r = cli(
        "run",
        str(tmp_path / "m.pt"),
        str(tmp_path / "x.pt"),
        "--trust",
        "--pythonpath",
        str(pkg),
        "--import",
        "mynet",
    )
    assert r.code == 0, r.err


def test_json_into_missing_folder_is_one_line_exit_2(example_files: Path, tmp_path: Path) -> None:
    r = cli(
        "run",
        str(example_files / "forum_model.pt"),
        str(example_files / "forum_input.pt"),
        "--trust",
        "--json",
        str(tmp_path / "no" / "such" / "r.json"),
    )
    assert r.code == 2, (r.out, r.err)
    _one_line_error(r.err)
    assert "cannot write" in r.err
