"""TorchScript backend: rewrite the inlined forward graph so that it also returns every
`aten::batch_norm`'s input, output and arguments, then run it once.

Forward hooks do not fire inside a ScriptModule, so the graph itself is changed (on a copy): the
return value becomes (original output, x_1, y_1, training_1, eps_1, momentum_1, x_2, ...). The BN's
module path comes from the GetAttr chain that fetches its weight (self.layer1.0.bn1.weight ->
"layer1.0.bn1"); its parameters are read from the module itself.

Safety: a TorchScript archive holds code (TorchScript programs) that runs when the model is
called, and `torch.jit.load` unpickles its constants; bn-diff opens one only with --trust.

What cannot be checked is said, never skipped in silence: a frozen module (`torch.jit.freeze`)
has BN folded into conv weights and no `aten::batch_norm` left; a BN whose weight is not fetched
through a GetAttr chain has no module name.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from bn_diff.errors import InputError, ModelError, UsageError
from bn_diff.load import Inputs
from bn_diff.results import Finding

from .base import ExportedBn, ExportedRun, KeepBuffers
from .torch_export import TRUST_HINT

PER_BN = 5
"""Values appended to the return tuple per BN: x, y, training, eps, momentum."""


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with <name>/code/ and <name>/constants.pkl members."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def attr_path(value: Any) -> str | None:
    """ "layer1.0.bn1.weight" for a value fetched as self.layer1.0.bn1.weight; None otherwise."""
    parts: list[str] = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        parts.append(node.s("name"))
        node = node.input().node()
    if not parts or node.kind() != "prim::Param":
        return None
    return ".".join(reversed(parts))


def load(path: Path, trust: bool) -> Any:
    if not trust:
        raise InputError(
            f"{path} is a TorchScript archive; it holds code that runs when the model is called, "
            "so bn-diff refuses it",
            TRUST_HINT,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in 2.x
            return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except FileNotFoundError:
        raise InputError(f"exported model {path} does not exist", "check the path") from None
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{path} is not a loadable TorchScript archive ({first[:160]})", None
        ) from None


def run_module(sm: Any, inputs: Inputs, label: str) -> ExportedRun:
    """Run a ScriptModule once with every aten::batch_norm exposed."""
    if inputs.kwargs:
        raise UsageError(
            "a TorchScript module is fed positional inputs only", "save a tensor or a tuple"
        )
    graph = sm.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    bns = graph.findAllNodes("aten::batch_norm")
    findings: list[Finding] = []
    ret = graph.return_node()
    orig = list(ret.inputs())
    extra: list[Any] = []
    names: list[str | None] = []
    for b in bns:
        ins = list(b.inputs())
        path = attr_path(ins[1]) or attr_path(ins[3])
        names.append(path.rpartition(".")[0] if path else None)
        # copies taken right after the BN: a later in-place op (relu_) must not change them
        with graph.insert_point_guard(b):
            xc = graph.insert("aten::clone", [ins[0]])
            yc = graph.insert("aten::clone", [b.output()])
        yc.node().moveAfter(b)
        xc.node().moveAfter(b)
        extra += [xc, yc, ins[5], ins[7], ins[6]]
    tup = graph.create("prim::TupleConstruct", orig + extra)
    tup.insertBefore(ret)
    tup.output().setType(torch._C.TupleType([v.type() for v in orig + extra]))
    for _ in orig:
        ret.removeInput(0)
    ret.addInput(tup.output())
    try:
        fn = torch._C._create_function_from_graph("bn_diff_forward", graph)
    except RuntimeError as e:
        raise InputError(
            f"{label}: cannot instrument the TorchScript graph ({str(e)[:160]})", None
        ) from None
    try:
        with torch.no_grad(), KeepBuffers(sm):
            res = fn(sm._c, *inputs.args)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs.args)
        raise ModelError(
            f"the TorchScript module failed on input {shapes}: {first[:200]}", None
        ) from None
    res = tuple(res)
    outs = res[: len(orig)]
    layers: list[ExportedBn] = []
    for i, name in enumerate(names):
        x, y, training, eps, mom = res[len(orig) + PER_BN * i : len(orig) + PER_BN * (i + 1)]
        mod = _submodule(sm, name)
        layers.append(
            ExportedBn(
                node=f"aten::batch_norm #{i + 1}",
                op="aten::batch_norm",
                name=name,
                kind="bn",
                x=x.detach(),
                y=y.detach(),
                weight=_param(mod, "weight"),
                bias=_param(mod, "bias"),
                running_mean=_param(mod, "running_mean"),
                running_var=_param(mod, "running_var"),
                eps=float(eps),
                momentum=None if mom is None else float(mom),
                training=bool(training) or _param(mod, "running_mean") is None,
                skip_reason=""
                if mod is not None
                else (
                    "its weight is not fetched through a GetAttr chain, so neither its module "
                    "name nor its parameters are known"
                ),
            )
        )
    if not bns:
        findings.append(
            Finding(
                "torchscript_no_bn",
                "warning",
                "the inlined TorchScript graph has no aten::batch_norm (a frozen module folds BN "
                "into conv weights): per-layer BN checks were skipped",
                "check the module before torch.jit.freeze, or export to ONNX / torch.export",
            )
        )
    leaves = torch.utils._pytree.tree_leaves(outs[0] if len(outs) == 1 else outs)
    return ExportedRun(
        path=label,
        format="torchscript",
        exporter="torchscript",
        layers=layers,
        outputs=[t for t in leaves if isinstance(t, torch.Tensor)],
        findings=findings,
    )


def _submodule(sm: Any, name: str | None) -> Any:
    if name is None:
        return None
    m = sm
    for part in name.split(".") if name else []:
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _param(mod: Any, attr: str) -> torch.Tensor | None:
    v = getattr(mod, attr, None) if mod is not None else None
    return v.detach().clone() if isinstance(v, torch.Tensor) else None


def run_file(path: Path, inputs: Inputs, trust: bool) -> ExportedRun:
    return run_module(load(path, trust), inputs, str(path))
