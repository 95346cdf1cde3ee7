"""`run --reference`: loading, layouts, the hook extension, the first divergence, the CLI."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bn_diff import pipeline
from bn_diff.cli import main
from bn_diff.diagnose_ext import ReferenceCheck, summarize
from bn_diff.errors import InputError, UsageError
from bn_diff.reference import Reference, check_names, layouts, load_reference
from bn_diff.results import Tolerance

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
sys.path.insert(0, str(EXAMPLES))
import models  # noqa: E402


def cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0)


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every conv and BN output of one forward, by qualified name (what a user would save)."""
    from make_reference import foreign_outputs

    return {k: torch.from_numpy(v) for k, v in foreign_outputs(model, x).items()}


def forum_reference() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = models.forum_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv = net[0](x)
        y = conv * net[1].weight.view(1, -1, 1, 1) + net[1].bias.view(1, -1, 1, 1)
    return net, x, y


def run_with(model: nn.Module, x: torch.Tensor, ref: Reference, **kw: object):  # type: ignore[no-untyped-def]
    check = ReferenceCheck(ref, Tolerance())
    return summarize(pipeline.run(model, x, extensions=[check], **kw), check)  # type: ignore[arg-type]


# --- the forum case ------------------------------------------------------------------------------
def test_forum_case_names_the_tie_and_the_untrained_statistics() -> None:
    net, x, y = forum_reference()
    before = copy.deepcopy(net.state_dict())
    report = run_with(net, x, Reference({"bn": y}, "forum"))
    lr = report.layers[0]
    ids = [h.hypothesis for h in lr.diagnosis]
    assert set(ids[:2]) == {"affine_only", "eval_untrained_stats"}
    assert lr.diagnosis[0].tied_with and lr.diagnosis[1].tied_with
    assert all("still at their initial values" in h.explanation for h in lr.diagnosis[:2])
    assert report.extra["reference"]["first_divergent"] == "bn"
    assert any(f.id == "reference_diverges" for f in report.findings)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training  # left as found


# --- a model with several referenced layers ------------------------------------------------------
@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    model = models.calibrate(models.SmallCNN(), (8, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    foreign = copy.deepcopy(model)
    foreign.bn2.eps = 1e-3  # what a Keras port does
    return model, x, outputs(foreign, x)


def test_first_divergence_in_execution_order_and_upstream(cnn) -> None:  # type: ignore[no-untyped-def]
    model, x, out = cnn
    keep = ("bn1", "bn2", "conv3", "bn3")
    report = run_with(model, x, Reference({k: out[k] for k in keep}, "foreign"))
    by = {lr.name: lr for lr in report.layers}
    assert by["bn1"].diagnosis[0].hypothesis == "matches_pytorch"
    assert not by["bn1"].extra["reference"]["diverges"]
    top = by["bn2"].diagnosis[0]
    assert top.hypothesis == "eps_mismatch" and top.params["eps"] == 1e-3
    assert by["bn2"].extra["reference"]["starts"] == "bn"
    # bn3's input already differs (bn2's error propagated): its BN matches PyTorch on that input
    info3 = by["bn3"].extra["reference"]
    assert info3["starts"] == "before" and not info3["producer"]["ok"]
    assert by["bn3"].diagnosis[0].hypothesis == "matches_pytorch"
    summary = report.extra["reference"]
    assert summary["first_divergent"] == "bn2" and summary["starts"] == "bn"
    assert summary["layers"] == ["bn1", "bn2", "bn3"]


def test_channels_last_reference_is_read_as_such(cnn) -> None:  # type: ignore[no-untyped-def]
    model, x, _ = cnn
    own = outputs(model, x)
    nhwc = own["bn2"].permute(0, 2, 3, 1).contiguous()
    report = run_with(model, x, Reference({"bn2": nhwc}, "nhwc", "auto"))
    lr = next(lr for lr in report.layers if lr.name == "bn2")
    assert lr.extra["reference"]["layout"] == "nhwc"
    assert lr.diagnosis[0].hypothesis == "matches_pytorch"
    with pytest.raises(InputError, match=r"has shape \(4, 8, 8, 32\).*\(4, 32, 8, 8\) \(NCHW\)$"):
        run_with(model, x, Reference({"bn2": nhwc}, "nhwc", "nchw"))


def test_no_reference_no_diagnosis(cnn) -> None:  # type: ignore[no-untyped-def]
    model, x, _ = cnn
    report = pipeline.run(model, x)
    assert all(lr.diagnosis == () and "reference" not in lr.extra for lr in report.layers)
    assert "reference" not in report.to_json() and "diagnosis" not in report.to_json()["layers"][0]


def test_unused_reference_keys_are_reported(cnn) -> None:  # type: ignore[no-untyped-def]
    model, x, out = cnn
    report = run_with(
        model, x, Reference({"bn1": out["bn1"], "bn3": out["bn3"]}, "r"), layers=["bn1"]
    )
    unused = next(f for f in report.findings if f.id == "reference_unused")
    assert "bn3" in unused.message


# --- loading -------------------------------------------------------------------------------------
def test_formats(tmp_path: Path) -> None:
    a = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "r.npz", **{"layer1.0.bn1": a, "bn2": a[:, :2]})
    assert set(load_reference(tmp_path / "r.npz").tensors) == {"layer1.0.bn1", "bn2"}
    torch.save({"bn1": torch.from_numpy(a)}, tmp_path / "r.pt")
    assert list(load_reference(tmp_path / "r.pt").tensors) == ["bn1"]
    d = tmp_path / "dir"
    d.mkdir()
    np.save(d / "layer1.0.bn1.npy", a)
    np.save(d / "bn2.npy", a)
    assert set(load_reference(d).tensors) == {"layer1.0.bn1", "bn2"}
    np.save(tmp_path / "one.npy", a)
    assert list(load_reference(tmp_path / "one.npy", layer="bn1").tensors) == ["bn1"]
    torch.save(torch.from_numpy(a), tmp_path / "one.pt")
    with pytest.raises(UsageError, match="--reference-layer"):
        load_reference(tmp_path / "one.pt")
    with pytest.raises(UsageError, match="not among"):
        load_reference(tmp_path / "r.npz", layer="nope")


def test_unsafe_and_broken_files_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="would unpickle"):
        load_reference(tmp_path / "obj.npy", layer="bn1")
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 4), np.float32))
    raw = good.read_bytes()
    (tmp_path / "forged.npy").write_bytes(raw.replace(b"(4, 4)", b"(9999, 9999)"))
    with pytest.raises(InputError, match="header claims"):
        load_reference(tmp_path / "forged.npy", layer="bn1")
    torch.save(
        {"bn1": argparse.Namespace(a=1)}, tmp_path / "evil.pt"
    )  # a class: unpickling runs code
    with pytest.raises(InputError, match="refuses|cannot be loaded safely"):
        load_reference(tmp_path / "evil.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .npy files"):
        load_reference(tmp_path / "empty")


def test_layouts_and_names() -> None:
    t = torch.zeros(2, 4, 4, 4)  # C == H == W: both readings fit
    assert [lay for lay, _ in layouts(t, (2, 4, 4, 4), "auto", "bn")] == ["nchw", "nhwc"]
    assert [lay for lay, _ in layouts(t, (2, 4, 4, 4), "nhwc", "bn")] == ["nhwc"]
    assert [lay for lay, _ in layouts(torch.zeros(5, 3), (5, 3), "nhwc", "bn")] == ["nchw"]
    with pytest.raises(InputError, match=r"\(2, 5, 6, 7\) \(NCHW\) or \(2, 6, 7, 5\) \(NHWC\)"):
        layouts(t, (2, 5, 6, 7), "auto", "bn")
    with pytest.raises(InputError, match="'layer1.0.bn' names no BatchNorm") as e:
        check_names(Reference({"layer1.0.bn": t}, "r"), ["bn1", "layer1.0.bn1"], ["conv1"])
    assert e.value.hint is not None and "did you mean layer1.0.bn1" in e.value.hint
    check_names(Reference({"bn1#2": t, "conv1": t}, "r"), ["bn1"], ["conv1"])


# --- through the real entry point ----------------------------------------------------------------
def _forum_files(tmp_path: Path) -> None:
    net, x, y = forum_reference()
    torch.save(net, tmp_path / "forum.pt")
    torch.save(x, tmp_path / "input.pt")
    np.savez(tmp_path / "theirs.npz", **{"bn": y.numpy()})


def test_cli_reference_npz_console_and_json(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    _forum_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    code = cli(
        [
            "run",
            "forum.pt",
            "input.pt",
            "--trust",
            "--reference",
            "theirs.npz",
            "--json",
            "report.json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1  # PyTorch agrees with its recompute, but the reference diverges: exit 1
    doc = json.loads((tmp_path / "report.json").read_text())
    diag = doc["layers"][0]["diagnosis"]
    assert {d["hypothesis"] for d in diag[:2]} == {"affine_only", "eval_untrained_stats"}
    assert diag[0]["tied_with"] and "max_abs_residual" in diag[0]
    assert doc["reference"]["first_divergent"] == "bn"
    snap = SNAPSHOTS / "run_reference_forum.txt"
    if os.environ.get("BN_DIFF_UPDATE_SNAPSHOTS"):
        snap.parent.mkdir(exist_ok=True)
        snap.write_text(out)
    assert out == snap.read_text()


def test_cli_reference_errors(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    _forum_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "300")
    torch.save(torch.zeros(4, 2, 8, 8), tmp_path / "single.pt")
    base = ["run", "forum.pt", "input.pt", "--trust"]
    assert cli([*base, "--reference", "single.pt"]) == 2
    assert "--reference-layer" in capsys.readouterr().err
    assert cli([*base, "--reference-layer", "1"]) == 2
    assert "needs --reference" in capsys.readouterr().err
    assert cli([*base, "--reference", "single.pt", "--reference-layer", "nope"]) == 2
    assert "is not a BatchNorm or conv layer" in capsys.readouterr().err
    np.savez(tmp_path / "bad_key.npz", **{"nope": np.zeros((4, 2, 8, 8), np.float32)})
    assert cli([*base, "--reference", "bad_key.npz"]) == 3
    assert "names no BatchNorm or conv layer" in capsys.readouterr().err
    np.savez(tmp_path / "bad_shape.npz", **{"bn": np.zeros((4, 2, 8), np.float32)})
    assert cli([*base, "--reference", "bad_shape.npz"]) == 3
    err = capsys.readouterr().err
    assert "has shape (4, 2, 8)" in err and "(4, 2, 8, 8) (NCHW)" in err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert (
        cli(
            [
                *base,
                "--reference",
                "single.pt",
                "--reference-layer",
                "bn",
                "--reference-layout",
                "nhwc",
            ]
        )
        == 3
    )


def test_example_port_with_keras_eps(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import make_examples
    import make_reference

    make_examples.main(tmp_path)
    make_reference.main(tmp_path)
    capsys.readouterr()
    code = cli(
        [
            "run",
            str(tmp_path / "small_cnn.safetensors"),
            str(tmp_path / "cnn_input.npy"),
            "--arch",
            "models:small_cnn",
            "--pythonpath",
            str(EXAMPLES),
            "--reference",
            str(tmp_path / "theirs.npz"),
            "--json",
            "-",
        ]
    )
    assert code == 1  # the port diverges (Keras eps)
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["reference"]["first_divergent"] == "bn1" and doc["reference"]["starts"] == "bn"
    layers = {lr["name"]: lr for lr in doc["layers"]}
    for name in ("bn1", "bn2", "bn3"):
        top = layers[name]["diagnosis"][0]
        assert top["hypothesis"] == "eps_mismatch" and top["params"]["eps"] == 1e-3
    assert layers["bn2"]["reference"]["starts"] == "before"
    assert [f["id"] for f in doc["findings"]] == ["reference_diverges"]
