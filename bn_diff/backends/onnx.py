"""ONNX backend: run an .onnx file once in onnxruntime with every BN- and conv-related value
exposed as a graph output; take each BatchNormalization node (or conv holding a folded BN) apart.

Safety: an ONNX file is a protobuf; loading it runs no code from the file, and onnxruntime runs
only ONNX operators (custom-op libraries are never registered here). `onnx.load` refuses external
data paths that leave the model's folder.

Module names come from the exporter:
- the dynamo exporter (`torch.onnx.export(..., dynamo=True)`) writes `metadata_props`:
  `pkg.torch.onnx.name_scopes` = "['', 'layer1', 'layer1.0', 'layer1.0.bn1', '<fx node>']" and
  `namespace` = ": Net/layer1: Sequential/.../layer1.0.bn1: BatchNorm2d/<fx node>: <aten op>". Its
  optimizer folds BN into the preceding Conv (rule FuseBatchNormIntoConv) and keeps the BN's
  namespace on the folded Conv, so a folded BN is still named.
- the legacy exporter (`dynamo=False`) names nodes by scope:
  "/layer1/layer1.0/bn1/BatchNormalization" (a Sequential child is "<parent>.<index>"). In eval
  mode it folds BN into Conv and the BN's name is lost; `check --against` recovers it from the
  eager model's conv -> BN edges.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bn_diff.errors import InputError, ModelError, UsageError
from bn_diff.load import Inputs
from bn_diff.results import Finding

from .base import ROOT, ExportedBn, ExportedConv, ExportedRun

CONV_OPS = ("Conv", "ConvTranspose", "Gemm")
_HINT = "pip install 'bn-diff[onnx]'"

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _import() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        missing = getattr(e, "name", None) or "onnx/onnxruntime"
        raise UsageError(
            f"checking an ONNX model needs {missing}, which is not installed", _HINT
        ) from None
    return onnx, onnxruntime


def legacy_scope(node_name: str) -> str | None:
    """ "/layer1/layer1.0/downsample/downsample.0/Conv" -> "layer1.0.downsample.0";
    "/BatchNormalization" (an op of the model's own forward) -> "(model)"."""
    if not node_name.startswith("/"):
        return None
    path: list[str] = []
    prev: str | None = None
    for seg in node_name.split("/")[1:-1]:
        if prev is not None and seg.startswith(prev + "."):
            path.append(seg[len(prev) + 1 :])
        else:
            path.append(seg)
        prev = seg
    return ".".join(path) or ROOT


def _meta(node: Any) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _namespace(meta: dict[str, str]) -> list[tuple[str, str]]:
    """`namespace` metadata as (name, class-or-op) pairs, outermost first."""
    ns = meta.get("namespace")
    if not ns:
        return []
    out = []
    for seg in ns.split("/"):
        name, _, what = seg.partition(": ")
        out.append((name.strip(), what.strip()))
    return out


def module_of(node: Any) -> str | None:
    """The PyTorch module a node came from, from dynamo metadata or legacy scope names."""
    meta = _meta(node)
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            lst = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            lst = None
        if isinstance(lst, list) and len(lst) >= 2:
            return str(lst[-2]) or ROOT
    ns = _namespace(meta)
    if len(ns) >= 2:
        return ns[-2][0] or ROOT
    return legacy_scope(node.name)


def source_op(node: Any) -> str:
    """The aten op the exporter translated this node from ("" when not recorded)."""
    ns = _namespace(_meta(node))
    return ns[-1][1] if ns else ""


def _source_training(op: str) -> bool | None:
    if not op or "batch_norm" not in op:
        return None
    if "no_training" in op or "_no_update" in op:
        return False
    if (
        "legit_functional" in op
        or "with_update" in op
        or op.startswith(("aten._native_batch_norm_legit.", "aten.native_batch_norm."))
    ):
        return True
    return None


def _is_folded_conv(node: Any) -> bool:
    if node.op_type not in CONV_OPS:
        return False
    meta = _meta(node)
    if "FuseBatchNorm" in meta.get("pkg.onnxscript.rewriter.rule_name", ""):
        return True
    return "batch_norm" in source_op(node)


def load(path: Path) -> Any:
    """The ModelProto of an .onnx file, with one-line errors."""
    onnx, _ = _import()
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise InputError(f"exported model {path} does not exist", "check the path") from None
    except Exception as e:  # protobuf DecodeError, onnx ValidationError (external data), OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"exported model {path} is not a readable ONNX file ({first[:160]})",
            "re-export it; the file may be truncated",
        ) from None


def _opset(model: Any) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _attrs(node: Any) -> dict[str, Any]:
    onnx, _ = _import()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _subgraph_bn(model: Any) -> int:
    """BatchNormalization nodes hidden in If/Loop/Scan bodies (they cannot be exposed)."""
    count = 0

    def walk(graph: Any, top: bool) -> None:
        nonlocal count
        for n in graph.node:
            if not top and n.op_type == "BatchNormalization":
                count += 1
            for a in n.attribute:
                if a.g is not None and a.HasField("g"):
                    walk(a.g, False)
                for g in a.graphs:
                    walk(g, False)

    walk(model.graph, True)
    return count


def _expose(model: Any, names: list[str]) -> list[str]:
    """Add graph outputs for `names` (typed from shape inference); returns those exposed."""
    onnx, _ = _import()
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        typed = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    except Exception:
        typed = {}
    existing = {o.name for o in model.graph.output}
    elem_of = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *typed.values()]}
    producers = {o: n for n in model.graph.node for o in n.output}
    exposed = []
    for name in names:
        if name in existing:
            exposed.append(name)
            continue
        vi = typed.get(name)
        if vi is None:
            node = producers.get(name)
            elem = elem_of.get(node.input[0]) if node is not None and node.input else None
            if not elem:
                continue
            vi = onnx.helper.make_tensor_value_info(name, elem, None)
        model.graph.output.append(vi)
        existing.add(name)
        exposed.append(name)
    return exposed


def _feeds(sess: Any, inputs: Inputs) -> dict[str, np.ndarray[Any, Any]]:
    want = sess.get_inputs()
    names = [i.name for i in want]
    if inputs.kwargs:
        unknown = sorted(set(inputs.kwargs) - set(names))
        if unknown:
            raise UsageError(
                f"the exported model has no input named {', '.join(unknown)}",
                f"its inputs are {', '.join(names)}",
            )
    if len(inputs.args) + len(inputs.kwargs) != len(want):
        raise UsageError(
            f"the exported model takes {len(want)} input(s) ({', '.join(names)}); INPUT holds "
            f"{len(inputs.args) + len(inputs.kwargs)}",
            "save one tensor per model input",
        )
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    given = dict(zip(names, inputs.args, strict=False))
    given.update(inputs.kwargs)
    for arg in want:
        t = given[arg.name].detach().cpu()
        dt = _NP_TYPES.get(arg.type)
        if dt is None:
            raise UsageError(
                f"input {arg.name} has type {arg.type}, which bn-diff cannot feed", None
            )
        feeds[arg.name] = t.numpy().astype(dt, copy=False)
    return feeds


def run(model: Any, inputs: Inputs, label: str) -> ExportedRun:
    """Run `model` (a ModelProto) once; return its BN layers, conv nodes and final outputs."""
    onnx, ort = _import()
    if len(model.functions):
        model = onnx.inliner.inline_local_functions(model)
    opset = _opset(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    exporter = ""
    if any("pkg.torch.onnx.name_scopes" in _meta(n) or "namespace" in _meta(n) for n in graph.node):
        exporter = "dynamo"
    elif any(n.name.startswith("/") for n in graph.node):
        exporter = "legacy"
    final = [o.name for o in graph.output]
    needed: list[str] = []
    for n in graph.node:
        if n.op_type == "BatchNormalization":
            needed += [v for v in n.input if v and v not in inits]
            needed.append(n.output[0])
        elif n.op_type in CONV_OPS and n.input and n.output:
            needed += [v for v in (n.input[0], n.output[0]) if v not in inits]
    graph_inputs = {i.name for i in graph.input}
    needed = list(dict.fromkeys(v for v in needed if v not in graph_inputs))
    exposed = _expose(model, needed)
    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures come back as exceptions, said in one line
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"onnxruntime cannot load {label} ({first[:200]})", None) from None
    feeds = _feeds(sess, inputs)
    names = list(dict.fromkeys(final + exposed))
    try:
        arrays = sess.run(names, feeds, ro)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
        raise ModelError(
            f"onnxruntime failed to run {label} on {shapes}: {first[:200]}", None
        ) from None
    values: dict[str, torch.Tensor] = {
        k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in zip(names, arrays, strict=True)
    }
    for k, a in feeds.items():
        values[k] = torch.from_numpy(a)

    def value(name: str) -> torch.Tensor | None:
        if not name:
            return None
        if name in values:
            return values[name]
        if name in inits:
            return torch.from_numpy(np.array(onnx.numpy_helper.to_array(inits[name])))
        return None

    run_ = ExportedRun(
        path=label,
        format="onnx",
        exporter=exporter,
        layers=[],
        outputs=[values[n] for n in final if n in values],
        declares_folding=exporter == "dynamo",
    )
    for n in graph.node:
        if n.op_type == "BatchNormalization":
            run_.layers.append(_bn_layer(n, opset, value))
        elif n.op_type in CONV_OPS and n.input and n.output:
            x, y = value(n.input[0]), value(n.output[0])
            if x is None or y is None:
                continue
            if _is_folded_conv(n):
                run_.layers.append(_folded_layer(n, x, y))
            else:
                run_.convs.append(ExportedConv(node=n.name, name=module_of(n), x=x, y=y))
    hidden = _subgraph_bn(model)
    if hidden:
        run_.findings.append(
            Finding(
                "bn_in_subgraph",
                "warning",
                f"{hidden} BatchNormalization node(s) sit inside If/Loop/Scan bodies; their "
                "outputs cannot be exposed, so they were not checked",
            )
        )
    return run_


def _bn_layer(n: Any, opset: int, value: Any) -> ExportedBn:
    a = _attrs(n)
    ins = list(n.input) + [""] * (5 - len(n.input))
    outs = [o for o in n.output if o]
    if opset >= 14:
        training = int(a.get("training_mode", 0)) == 1
    elif opset >= 7:
        training = len(outs) > 1
    else:
        training = int(a.get("is_test", 0)) == 0
    x, y = value(ins[0]), value(n.output[0])
    skip = ""
    if opset < 9 and int(a.get("spatial", 1)) == 0:
        skip = "spatial=0 (per-activation statistics, opset < 9) is not a per-channel BatchNorm"
    if x is None or y is None:
        skip = skip or "its input or output could not be exposed as a graph output"
    onnx_momentum = float(a.get("momentum", 0.9))
    return ExportedBn(
        node=n.name or n.output[0],
        op="BatchNormalization",
        name=module_of(n),
        kind="bn",
        x=x,
        y=y if y is not None else torch.empty(0),
        weight=value(ins[1]),
        bias=value(ins[2]),
        running_mean=value(ins[3]),
        running_var=value(ins[4]),
        eps=float(a.get("epsilon", 1e-5)),
        momentum=float(np.float32(1.0) - np.float32(onnx_momentum)),
        training=training,
        source_training=_source_training(source_op(n)),
        skip_reason=skip,
    )


def _folded_layer(n: Any, x: torch.Tensor, y: torch.Tensor) -> ExportedBn:
    w = n.input[1] if len(n.input) > 1 else ""
    conv = w[: -len(".weight")] if w.endswith(".weight") else None
    return ExportedBn(
        node=n.name or n.output[0],
        op=n.op_type,
        name=module_of(n),
        kind="folded_conv",
        x=x,
        y=y,
        conv=conv,
        source_training=_source_training(source_op(n)),
    )


def run_file(path: Path, inputs: Inputs) -> ExportedRun:
    return run(load(path), inputs, str(path))
