"""`check` on ONNX exports: healthy exports of real architectures pass with every layer named;
each injected fault fails at the layer that has it, for the right reason."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from check_helpers import Exports, export, models
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bn_diff
from bn_diff.backends.onnx import legacy_scope


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def bn_node(model: onnx.ModelProto, layer: str) -> onnx.NodeProto:
    """The BatchNormalization node the dynamo exporter made for module `layer`."""
    for n in model.graph.node:
        scopes = _meta(n).get("pkg.torch.onnx.name_scopes")
        if n.op_type == "BatchNormalization" and scopes and layer in ast.literal_eval(scopes):
            return n
    raise LookupError(layer)


def folded_conv(model: onnx.ModelProto, layer: str) -> onnx.NodeProto:
    """The Conv node the dynamo optimizer folded BN `layer` into."""
    for n in model.graph.node:
        if n.op_type == "Conv" and f"/{layer}: " in _meta(n).get("namespace", ""):
            return n
    raise LookupError(layer)


def failed(report: bn_diff.CheckReport) -> list[str]:
    return [lr.name for lr in report.failed_layers]


def ids(report: bn_diff.CheckReport, layer: str | None = None) -> set[str]:
    return {f.id for f in report.all_findings if layer is None or f.layer == layer}


# --- healthy exports ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet_tiny", "mobilenet_tiny"])
@pytest.mark.parametrize(
    ("kind", "exported_as"),
    [("dynamo", "folded_conv"), ("noopt", "bn"), ("legacy", "folded_conv"), ("legacy_bn", "bn")],
)
def test_healthy_export_passes_against_eager(
    exports: Exports, arch: str, kind: str, exported_as: str
) -> None:
    model = exports.model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = bn_diff.check(exports.path(arch, kind), exports.x, against=model)
    assert report, report.to_json()
    assert [lr.name for lr in report.layers] != []
    assert sorted(lr.name for lr in report.layers) == sorted(exports.bn_names(arch))
    assert {lr.extra["exported_as"] for lr in report.layers} == {exported_as}
    assert all(lr.extra["checked"] and lr.numel > 0 for lr in report.layers)
    assert report.outputs and all(report.outputs)
    if exported_as == "folded_conv":
        # the conv each BN went into is named (dynamo: by the export; legacy: by the eager model)
        assert all(lr.extra["folded_into"] == lr.info.producer for lr in report.layers)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_self_check_of_unfolded_export_recomputes_every_node(exports: Exports) -> None:
    report = bn_diff.check(exports.path("resnet_tiny", "noopt"), exports.x)
    assert report
    assert sorted(lr.name for lr in report.layers) == sorted(exports.bn_names("resnet_tiny"))
    assert all(lr.extra["checked"] and lr.extra["exported_as"] == "bn" for lr in report.layers)
    assert not report.all_findings


def test_self_check_of_folded_export_says_nothing_was_checked(exports: Exports) -> None:
    path = exports.path("resnet_tiny", "dynamo")
    report = bn_diff.check(path, exports.x)
    assert report  # warnings only: the default gate is --fail-on error
    assert ids(report) == {"folded_bn_unchecked"}
    assert all(not lr.extra["checked"] for lr in report.layers)
    assert not bn_diff.check(path, exports.x, fail_on="warning")


def test_self_check_of_legacy_folded_export_warns_no_bn(exports: Exports) -> None:
    report = bn_diff.check(exports.path("resnet_tiny", "legacy"), exports.x)
    assert report.layers == () and ids(report) == {"no_bn_in_export"}


# --- injected faults ----------------------------------------------------------------------------
def test_altered_epsilon_fails_at_that_layer(exports: Exports) -> None:
    model = onnx.load(str(exports.path("resnet_tiny", "noopt")))
    node = bn_node(model, "layer1.0.bn2")
    for a in node.attribute:
        if a.name == "epsilon":
            a.f = 1e-3
    report = bn_diff.check(model, exports.x, against=exports.model("resnet_tiny"))
    assert failed(report) == ["layer1.0.bn2"]
    assert "eps_mismatch" in ids(report, "layer1.0.bn2")
    lr = report.failed_layers[0]
    assert lr.mismatched > 0 and lr.extra["export_eps"] == pytest.approx(1e-3)
    # on its own the graph is self-consistent: the runtime does what the graph says
    assert bn_diff.check(model, exports.x)


def test_one_channel_of_folded_conv_scaled_fails_at_that_layer_and_channel(
    exports: Exports,
) -> None:
    model = onnx.load(str(exports.path("resnet_tiny", "dynamo")))
    conv = folded_conv(model, "layer1.0.bn2")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w[3] *= 1.001
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    report = bn_diff.check(model, exports.x, against=exports.model("resnet_tiny"))
    assert failed(report) == ["layer1.0.bn2"]
    lr = report.failed_layers[0]
    assert lr.extra["exported_as"] == "folded_conv" and lr.extra["folded_into"] == "layer1.0.conv2"
    assert [c.index for c in lr.channels if c.mismatched] == [3]


def test_bn_exported_with_training_mode_fails(exports: Exports) -> None:
    model = onnx.load(str(exports.path("resnet_tiny", "noopt")))
    node = bn_node(model, "layer2.0.bn1")
    node.attribute.append(helper.make_attribute("training_mode", 1))
    node.output.extend(["layer2.0.bn1.running_mean_out", "layer2.0.bn1.running_var_out"])
    against = bn_diff.check(model, exports.x, against=exports.model("resnet_tiny"))
    assert failed(against) == ["layer2.0.bn1"]
    assert {"export_train_mode", "mode_mismatch"} <= ids(against, "layer2.0.bn1")
    alone = bn_diff.check(model, exports.x)
    assert failed(alone) == ["layer2.0.bn1"]
    assert ids(alone) == {"export_train_mode"}
    # the runtime did normalize with batch statistics, as the node says: the numbers agree
    assert alone.failed_layers[0].mismatched == 0


@pytest.mark.parametrize("kind", ["noopt", "dynamo"])
def test_export_before_running_stats_were_loaded_fails_every_layer(
    exports: Exports, tmp_path: Path, kind: str
) -> None:
    trained = exports.model("resnet_tiny")
    model = models.resnet_tiny()
    path = export(model, exports.x, tmp_path / f"early_{kind}.onnx", kind)
    model.load_state_dict(trained.state_dict())  # ... and only now the checkpoint is loaded
    report = bn_diff.check(path, exports.x, against=model)
    assert sorted(failed(report)) == sorted(exports.bn_names("resnet_tiny"))
    assert all(lr.mismatched for lr in report.failed_layers)
    if kind == "noopt":
        assert all("stale_running_stats" in ids(report, n) for n in failed(report))
    assert "final_output_mismatch" in ids(report)


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
def test_layer_missing_from_export_is_listed_and_fails(
    exports: Exports, tmp_path: Path, kind: str
) -> None:
    trained = exports.model("resnet_tiny")
    broken = copy.deepcopy(trained)
    broken.layer1[0].bn2 = torch.nn.Identity()
    path = export(broken, exports.x, tmp_path / f"missing_{kind}.onnx", kind)
    report = bn_diff.check(path, exports.x, against=trained)
    assert failed(report) == ["layer1.0.bn2"]
    lr = report.failed_layers[0]
    assert lr.extra["exported_as"] == "missing" and ids(report, "layer1.0.bn2") == {"layer_missing"}
    assert len(report.layers) == len(exports.bn_names("resnet_tiny"))  # listed, not dropped
    assert report.to_json()["summary"]["missing"] == 1


def test_train_mode_model_exported_as_eval_is_a_mode_mismatch(
    exports: Exports, tmp_path: Path
) -> None:
    model = copy.deepcopy(exports.model("mobilenet_tiny")).train()
    path = export(model, exports.x, tmp_path / "train.onnx", "noopt")
    against = bn_diff.check(path, exports.x, against=model)
    assert sorted(failed(against)) == sorted(exports.bn_names("mobilenet_tiny"))
    assert all("mode_mismatch" in ids(against, n) for n in failed(against))
    alone = bn_diff.check(path, exports.x)
    assert alone and "export_mode_changed" in ids(alone)  # a warning on its own
    assert all(m.training for m in model.modules())  # the eager model was left in train mode


def test_layer_only_in_export_is_listed(exports: Exports) -> None:
    """An eager model without one BN: the export's extra layer is listed and fails."""
    trained = exports.model("resnet_tiny")
    smaller = copy.deepcopy(trained)
    smaller.layer1[0].bn2 = torch.nn.Identity()
    report = bn_diff.check(exports.path("resnet_tiny", "noopt"), exports.x, against=smaller)
    assert "layer1.0.bn2" in failed(report)
    assert "layer_not_in_eager" in ids(report, "layer1.0.bn2")


# --- legacy scope names -------------------------------------------------------------------------
def _unqualified(qualified: str) -> str:
    """The legacy exporter's scope segment of a module (torch.onnx.utils): its name from the last
    non-numeric atom on ("features.1.conv.0" -> "conv.0"; all-numeric names stay whole)."""
    atoms = qualified.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return qualified


atom = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), st.integers(0, 12).map(str)
)


@given(st.lists(atom, min_size=1, max_size=7))
def test_legacy_scope_inverts_the_exporters_naming(path: list[str]) -> None:
    segments = [_unqualified(".".join(path[: i + 1])) for i in range(len(path))]
    node_name = "/" + "/".join(segments) + "/BatchNormalization"
    assert legacy_scope(node_name) == ".".join(path)


# --- BatchNormalization across opsets (hand-made graphs) ----------------------------------------
def bn_graph(
    opset: int, outputs: int = 1, param_shape: tuple[int, ...] = (3,), **attrs: object
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    params = {
        "scale": rng.normal(1, 0.2, param_shape),
        "bias": rng.normal(0, 0.2, param_shape),
        "mean": rng.normal(0, 0.5, param_shape),
        "var": rng.uniform(0.5, 2, param_shape),
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in params.items()]
    outs = ["y"] + [f"stat{i}" for i in range(outputs - 1)]
    node = helper.make_node(
        "BatchNormalization", ["x", *params], outs, name="/bn/BatchNormalization", **attrs
    )
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 4, 4])
    graph = helper.make_graph([node], "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize(
    ("opset", "outputs", "attrs", "mode"),
    [
        (9, 1, {}, "eval"),
        (9, 5, {}, "train"),  # opsets 7-13: five outputs mean training
        (12, 1, {"epsilon": 1e-3}, "eval"),
        (14, 1, {}, "eval"),
        (15, 3, {"training_mode": 1}, "train"),
    ],
)
def test_bn_node_semantics_by_opset(
    opset: int, outputs: int, attrs: dict[str, object], mode: str
) -> None:
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    report = bn_diff.check(bn_graph(opset, outputs, **attrs), x)
    (lr,) = report.layers
    assert lr.name == "bn" and lr.info.mode == mode and lr.mismatched == 0 and lr.numel == x.numel()
    assert lr.info.eps == pytest.approx(attrs.get("epsilon", 1e-5))
    assert ids(report) == ({"export_train_mode"} if mode == "train" else set())
    assert bool(report) == (mode == "eval")


def test_bn_node_with_spatial_0_is_skipped_and_said(tmp_path: Path) -> None:
    model = bn_graph(7, param_shape=(3, 4, 4), spatial=0)
    report = bn_diff.check(model, torch.randn(2, 3, 4, 4))
    (lr,) = report.layers
    assert not lr.extra["checked"] and ids(report) == {"bn_check_skipped"}
    assert "spatial=0" in report.all_findings[0].message
