"""`bn-diff check` through the real entry point: exit codes, terminal output (snapshot at width
100, no colour), JUnit XML, JSON (schema bn-diff/check/v1), GitHub annotations, one-line errors."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import onnx
import pytest
from check_helpers import REPO, Exports

import bn_diff
from bn_diff.cli import main

HERE = Path(__file__).resolve().parent
SNAPSHOTS = HERE / "snapshots"
FAULT = "layer1.0.bn2"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture
def workdir(exports: Exports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with model.pt (state_dict), input.pt, good.onnx (folded) and eps.onnx (fault)."""
    sd, inp = exports.files("resnet_tiny")
    shutil.copy(sd, tmp_path / "model.pt")
    shutil.copy(inp, tmp_path / "input.pt")
    # the dynamo exporter keeps weights in a .onnx.data file beside the model: save one file
    onnx.save(onnx.load(str(exports.path("resnet_tiny", "dynamo"))), str(tmp_path / "good.onnx"))
    model = onnx.load(str(exports.path("resnet_tiny", "noopt")))
    for n in model.graph.node:
        scopes = {p.key: p.value for p in n.metadata_props}.get("pkg.torch.onnx.name_scopes", "[]")
        if n.op_type == "BatchNormalization" and FAULT in ast.literal_eval(scopes):
            next(a for a in n.attribute if a.name == "epsilon").f = 1e-3
    onnx.save(model, str(tmp_path / "eps.onnx"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    return tmp_path


AGAINST = [
    "--against",
    "model.pt",
    "--arch",
    "models:resnet_tiny",
    "--pythonpath",
    str(REPO / "examples"),
]


def normalize(text: str) -> str:
    """Numbers at rounding level (below 1e-4, except the eps and atol 1e-05) vary with the CPU:
    mask them, and the spacing that follows their width."""
    text = re.sub(r"\b(?!1e-05\b)\d(?:\.\d+)?e-(?:0[5-9]|[1-9]\d)\b", "~0", text)
    return "\n".join(re.sub(r"\s+", " ", line).strip() for line in text.splitlines()).strip() + "\n"


def one_error(err: str) -> bool:
    """One message (rich may wrap it at the terminal width), no traceback."""
    return err.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err


def test_passing_export_exits_0(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["check", "good.onnx", *AGAINST, "--input", "input.pt"], capsys)
    assert code == 0, err
    assert (
        "✔ check passed: all 17 BatchNorm layers (17 folded into convs) agree with the eager model."
        in out
    )
    assert "folded: layer1.0.conv2" in out


def test_eps_fault_exits_1_and_matches_snapshot(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["check", "eps.onnx", *AGAINST, "--input", "input.pt"], capsys)
    assert code == 1
    snap = SNAPSHOTS / "check_eps_fault.txt"
    if os.environ.get("BN_DIFF_UPDATE_SNAPSHOTS"):
        snap.parent.mkdir(exist_ok=True)
        snap.write_text(normalize(out), encoding="utf-8")
    assert normalize(out) == snap.read_text(encoding="utf-8")


def test_junit_has_one_testcase_per_layer_and_the_mismatch_text(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run_cli(
        ["check", "eps.onnx", *AGAINST, "--input", "input.pt", "--junit", "out/j.xml"], capsys
    )
    assert code == 2  # the folder does not exist: a usage error, and no file at all
    assert not (workdir / "out").exists()
    code, _, _ = run_cli(
        ["check", "eps.onnx", *AGAINST, "--input", "input.pt", "--junit", "j.xml"], capsys
    )
    assert code == 1
    suite = ET.parse(workdir / "j.xml").getroot().find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == 17 + 1 + 1  # layers, final output, run-wide findings
    failing = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failing] == [FAULT]
    failure = failing[0].find("failure")
    assert failure is not None and failure.text is not None
    assert "Mismatched elements:" in failure.text and "eps_mismatch" in failure.text
    assert suite.get("failures") == "1" and suite.get("tests") == "19"
    assert not list(workdir.glob(".j.xml.*"))  # no temp file left behind


def test_junit_marks_unchecked_layers_skipped(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run_cli(["check", "good.onnx", "--input", "input.pt", "--junit", "j.xml"], capsys)
    assert code == 0
    suite = ET.parse(workdir / "j.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("skipped") == "17"
    code, _, _ = run_cli(
        ["check", "good.onnx", "--input", "input.pt", "--fail-on", "warning"], capsys
    )
    assert code == 1


def test_json_follows_schema_check_v1(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = json.loads((HERE / "check_v1.schema.json").read_text())
    code, _, _ = run_cli(
        ["check", "eps.onnx", *AGAINST, "--input", "input.pt", "--json", "r.json"], capsys
    )
    assert code == 1
    doc = json.loads((workdir / "r.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["ok"] is False and doc["summary"]["failed"] == 1
    bad = [lr for lr in doc["layers"] if not lr["ok"]]
    assert [lr["name"] for lr in bad] == [FAULT] and bad[0]["exported_as"] == "bn"
    assert bad[0]["export_eps"] == pytest.approx(1e-3)
    code, out, _ = run_cli(
        ["check", "good.onnx", *AGAINST, "--input", "input.pt", "--json", "-"], capsys
    )
    assert code == 0
    doc = json.loads(out)  # stdout is nothing but the JSON
    jsonschema.validate(doc, schema)
    assert {lr["exported_as"] for lr in doc["layers"]} == {"folded_conv"}


def test_github_annotations(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    code, out, _ = run_cli(["check", "eps.onnx", *AGAINST, "--input", "input.pt"], capsys)
    assert code == 1
    errors = [line for line in out.splitlines() if line.startswith("::error")]
    assert len(errors) == 1
    assert errors[0].startswith("::error title=bn-diff check eps.onnx::layer1.0.bn2: ")
    assert "eps_mismatch" in errors[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["check", "good.onnx", "--input", "input.pt", "--atol", "1e-4"],
            "--atol and --rtol go together",
        ),
        (
            ["check", "good.onnx", "--input", "input.pt", "--arch", "models:resnet_tiny"],
            "add --against",
        ),
        (["check", "good.onnx"], "missing INPUT"),
        (["check", "model.pt", "--input", "input.pt"], "not an exported model"),
        (["check", "good.onnx", "--input", "input.pt", "--fail-on", "never"], "never"),
    ],
)
def test_usage_errors_exit_2(
    workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert message in out + err and "Traceback" not in err


def test_unreadable_or_unsafe_inputs_exit_3(
    workdir: Path, exports: Exports, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "junk.onnx").write_bytes(b"\x08\x07not a protobuf at all" * 10)
    shutil.copy(exports.path("resnet_tiny", "pt2"), workdir / "m.pt2")
    for args, message in (
        (["check", "junk.onnx", "--input", "input.pt"], "not a readable ONNX file"),
        (["check", "nowhere.onnx", "--input", "input.pt"], "does not exist"),
        (["check", "m.pt2", "--input", "input.pt"], "pass --trust"),
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 3, err
        assert message in " ".join(err.split()) and one_error(err)
    code, _, err = run_cli(["check", "m.pt2", "--input", "input.pt", "--trust"], capsys)
    assert code == 0, err


def test_missing_onnxruntime_says_how_to_install(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run_cli(["check", "good.onnx", "--input", "input.pt"], capsys)
    assert code == 2
    assert "pip install 'bn-diff[onnx]'" in " ".join(err.split()) and one_error(err)


def test_assert_ok_names_the_failing_layer(workdir: Path, exports: Exports) -> None:
    bn_diff.check(
        workdir / "good.onnx", exports.x, against=exports.model("resnet_tiny")
    ).assert_ok()
    report = bn_diff.check(workdir / "eps.onnx", exports.x, against=exports.model("resnet_tiny"))
    with pytest.raises(AssertionError) as exc:
        report.assert_ok()
    text = str(exc.value)
    assert "layer1.0.bn2: " in text and "Mismatched elements:" in text and "eps_mismatch" in text
    assert "layer1.0.bn1:" not in text
