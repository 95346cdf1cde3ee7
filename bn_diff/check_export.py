"""`check`: gate an exported model (ONNX, torch.export, TorchScript) on its BatchNorm layers.

load -> run the export once (backends/) -> [capture the eager model] -> recompute -> compare ->
findings -> CheckReport. Nothing here prints or exits.

With an eager model (`against`), each exported BN is checked layer by layer: the eager layer's
arithmetic (its eps, mode, parameters and statistics) is applied in float64 to the *export's own
input of that layer* and compared with the export's output, per channel, with `run`'s tolerance
policy (`pipeline.check_call`). Feeding the export's input isolates each layer: a fault shows at
the layer that has it, not at every layer after it. A BN folded into a conv is checked as
BN_eager(conv_eager(x)) in float64 against the conv's output. The drift from the eager model's own
output of the layer is recorded too (`drift_from_eager`), and the final outputs are compared.
Without an eager model, each BN node is recomputed from its own parameters (what the graph says)
against what the runtime produced, with cheap health checks.

(The module is not called `check.py`: importing a submodule `bn_diff.check` would replace the
public function `bn_diff.check` on the package.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import load as load_mod
from .backends import ExportedBn, ExportedRun, run_exported
from .backends.base import canonical, unique_names
from .capture import BnCall
from .check_findings import (
    compare_outputs,
    config_findings,
    health_findings,
    missing,
    placeholder,
    shape_mismatch,
    skipped,
)
from .check_report import CheckReport, OutputCheck
from .compare import close, resolve
from .errors import UsageError
from .pipeline import as_inputs, bn_layer_names, check_call, load_inputs, make_tolerance
from .pipeline import run as run_eager
from .results import Finding, LayerResult, Tolerance


def check(
    exported: Any,
    inputs: Any,
    *,
    against: nn.Module | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    fail_on: str = "error",
    trust: bool = False,
    exported_name: str = "",
    model_name: str = "",
    input_name: str = "",
) -> CheckReport:
    """Check every BatchNorm of an exported model, against `against` when given.

    `exported`: a path (.onnx, .pt2, TorchScript archive), an onnx ModelProto, a
    torch.onnx.ONNXProgram, a torch.export.ExportedProgram or a ScriptModule. `inputs`: a tensor,
    a tuple/list of tensors, or `Inputs`. `trust` allows .pt2 and TorchScript files, which can run
    code when loaded. `report.assert_ok()` raises AssertionError with every failure (for pytest).
    """
    if fail_on not in ("warning", "error"):
        raise UsageError(f"--fail-on must be warning or error, not {fail_on!r}")
    tol = make_tolerance(atol, rtol)
    inp = as_inputs(inputs)
    label = exported_name or (str(exported) if isinstance(exported, (str, Path)) else "")
    exp = run_exported(exported, inp, trust=trust, label=label)
    outputs: tuple[OutputCheck, ...] = ()
    if against is None:
        layers, findings = _self_check(exp, tol)
    else:
        layers, findings, outputs = _against_eager(exp, against, inp, tol, model_name)
    return CheckReport(
        exported=exp.path,
        format=exp.format,
        exporter=exp.exporter,
        against=None if against is None else (model_name or type(against).__name__),
        input=input_name or inp.source,
        tolerance=tol,
        layers=tuple(layers),
        findings=tuple(exp.findings) + tuple(findings),
        outputs=outputs,
        fail_on=fail_on,  # type: ignore[arg-type]
    )


def check_files(
    exported: Path,
    input_path: Path | None,
    *,
    against: Path | None = None,
    input_shape: str | None = None,
    seed: int = 0,
    arch: str | None = None,
    trust: bool = False,
    imports: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
    **kwargs: Any,
) -> CheckReport:
    """`bn-diff check EXPORTED --input INPUT [--against MODEL]`: load, then `check`."""
    inp = load_inputs(input_path, input_shape, seed)
    model = None
    if against is not None:
        model = load_mod.load_model(
            against, arch=arch, trust=trust, imports=imports, pythonpath=pythonpath
        )
    return check(
        exported,
        inp,
        against=model,
        trust=trust,
        model_name="" if against is None else str(against),
        input_name=inp.source,
        **kwargs,
    )


# --- the export on its own ----------------------------------------------------------------------
def call_from_export(e: ExportedBn, name: str) -> BnCall:
    """The BnCall the export's node amounts to: its own parameters, input and output."""
    assert e.x is not None
    has_stats = e.running_mean is not None and e.running_var is not None
    return BnCall(
        name=name,
        type=e.op,
        x=e.x,
        y=e.y,
        training=e.training,
        use_batch_stats=e.training or not has_stats,
        weight=e.weight,
        bias=e.bias,
        running_mean_before=e.running_mean,
        running_var_before=e.running_var,
        num_batches_tracked_before=None,
        running_mean_after=None,
        running_var_after=None,
        num_batches_tracked_after=None,
        eps=1e-5 if e.eps is None else e.eps,
        momentum=e.momentum,
        affine=e.weight is not None or e.bias is not None,
        track_running_stats=has_stats,
        updates_running_stats=False,
        producer=e.conv,
        module=None,
    )


def _self_result(e: ExportedBn, name: str, tol: Tolerance) -> LayerResult:
    if e.kind == "folded_conv":
        return placeholder(name, e, "folded_conv", tol)
    if e.skip_reason or e.x is None:
        lr = placeholder(name, e, "bn", tol)
        skipped = Finding("bn_check_skipped", "warning", f"not checked: {e.skip_reason}", "", name)
        return replace(lr, findings=(skipped,))
    lr = check_call(call_from_export(e, name), tol)
    extra = {"exported_as": "bn", "checked": True, "exported_node": e.node, "export_op": e.op}
    return replace(lr, findings=lr.findings + tuple(health_findings(e, name)), extra=extra)


def _self_check(exp: ExportedRun, tol: Tolerance) -> tuple[list[LayerResult], list[Finding]]:
    unique_names(exp.layers)
    results = [_self_result(e, e.name or e.node, tol) for e in exp.layers]
    findings: list[Finding] = []
    folded = [lr.name for lr in results if lr.extra.get("exported_as") == "folded_conv"]
    if folded:
        shown = ", ".join(folded[:4]) + (", ..." if len(folded) > 4 else "")
        findings.append(
            Finding(
                "folded_bn_unchecked",
                "warning",
                f"{len(folded)} BatchNorm layer(s) were folded into convs by the exporter "
                f"({shown}); "
                "their folded weights cannot be checked without the eager model",
                "pass --against MODEL",
            )
        )
    if not exp.layers:
        findings.append(
            Finding(
                "no_bn_in_export",
                "warning",
                "the export has no BatchNorm node (an eval-mode export may have folded BN into "
                "convs without recording it): nothing was checked per layer",
                "pass --against MODEL to compare its convs with the eager BN layers",
            )
        )
    return results, findings


# --- against the eager model --------------------------------------------------------------------
class _Matcher:
    """Pairs eager BN calls with exported layers, and compares each pair inside the eager hook."""

    def __init__(self, exp: ExportedRun, model: nn.Module, tol: Tolerance) -> None:
        self.exp, self.model, self.tol = exp, model, tol
        known = set(bn_layer_names(model))
        for e in exp.layers:
            if e.name is not None:
                e.name = canonical(e.name, known)
        # queues by module name, in execution order: the k-th call of a module ("bn#k") takes
        # the first node left for it
        self.named: dict[str, deque[ExportedBn]] = {}
        self.unnamed: deque[ExportedBn] = deque()
        for e in exp.layers:
            if e.name is None:
                self.unnamed.append(e)
            else:
                self.named.setdefault(e.name, deque()).append(e)
        self.by_order = bool(exp.layers) and all(e.name is None for e in exp.layers)
        self.convs: dict[str, deque[Any]] = {}
        if not exp.declares_folding:
            for cv in exp.convs:
                if cv.name is not None:
                    self.convs.setdefault(cv.name, deque()).append(cv)

    def __call__(self, call: BnCall, res: LayerResult) -> LayerResult:
        e = self._take(call)
        if e is None:
            return missing(call, res, "")
        return self._compare(call, e, res)

    def _take(self, call: BnCall) -> ExportedBn | None:
        # a functional BN is "M:F.batch_norm" in the eager run, plain "M" in an export
        base = call.name.split("#")[0]
        q = self.named.get(base) or self.named.get(base.replace(":F.batch_norm", ""))
        cvs = self.convs.get(call.producer or "")
        if q and cvs and _near(cvs[0].y, call.y) and not _near(q[0].x, call.x):
            # an export that does not record folding, of a BN called twice: its first call went
            # into the conv (whose output is this call's), the node by its name is a later call
            q = None
        if q:
            e = q.popleft()
            e.name = call.name
            return e
        c = int(call.x.shape[1]) if call.x.dim() >= 2 else -1
        if self.by_order and self.unnamed and _channels(self.unnamed[0]) == c:
            e = self.unnamed.popleft()
            e.name, e.matched_by = call.name, "order"
            return e
        if cvs:
            cv = cvs.popleft()
            return ExportedBn(
                node=cv.node,
                op="Conv",
                name=call.name,
                kind="folded_conv",
                x=cv.x,
                y=cv.y,
                conv=call.producer,
                matched_by="producer",
            )
        return None

    def _compare(self, call: BnCall, e: ExportedBn, res: LayerResult) -> LayerResult:
        tol = self.tol
        extra: dict[str, Any] = {"exported_as": e.kind, "checked": True, "exported_node": e.node}
        if e.kind == "bn":
            if e.x is None or e.skip_reason:
                return skipped(call, e, tol)
            ref_x, how = e.x, "eager_layer_on_export_input"
        else:
            extra["folded_into"] = e.conv or call.producer
            conv = _submodule(self.model, call.producer)
            if conv is not None and e.x is not None:
                ref_x, how = conv_f64(conv, e.x), "eager_conv_and_layer_on_export_input"
            else:
                ref_x, how = call.x, "eager_output"
        extra["compared_with"] = how
        if e.matched_by:
            extra["matched_by"] = e.matched_by
        if tuple(ref_x.shape) != tuple(e.y.shape):
            return shape_mismatch(call, e, res, ref_x)
        lr = check_call(replace(call, x=ref_x, y=e.y, updates_running_stats=False), tol)
        if e.matched_by == "producer" and not lr and _is_plain_conv(e.y, ref_x, tol):
            return missing(
                call,
                res,
                f"; the export's output of conv {call.producer} equals the eager conv's without "
                "this BN (the BN was dropped, or folded with untrained statistics)",
            )
        if e.eps is not None:
            extra["export_eps"] = e.eps
        extra["export_mode"] = "train" if e.training else "eval"
        if call.y.shape == e.y.shape:
            extra["drift_from_eager"] = float((e.y.double() - call.y.double()).abs().max().item())
        found = config_findings(call, e)
        if e.kind == "bn":
            stale = any(f.id == "stale_running_stats" for f in found)
            found += [
                f
                for f in health_findings(e, call.name)
                if not (stale and f.id == "untrained_running_stats")  # said already, with more
            ]
        return replace(lr, findings=lr.findings + tuple(found), extra={**lr.extra, **extra})

    def leftovers(self) -> list[LayerResult]:
        """Exported layers no eager call claimed: listed, and each an error."""
        out = []
        rest = [e for q in self.named.values() for e in q] + list(self.unnamed)
        unique_names(rest)
        for e in rest:
            name = e.name or e.node
            lr = _self_result(e, name, self.tol)
            f = Finding(
                "layer_not_in_eager",
                "error",
                f"the export has {e.op} node {e.node} for {name}, but no BatchNorm of the eager "
                "model ran under that name",
                "export again from the model you compare with",
                name,
            )
            out.append(replace(lr, findings=lr.findings + (f,)))
        return out


def _near(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Loosely the same tensor (1e-3 of its scale): tells a pairing apart, not a pass."""
    if a is None or tuple(a.shape) != tuple(b.shape):
        return False
    scale = max(1.0, float(b.detach().abs().max().item())) if b.numel() else 1.0
    return float((a.double() - b.detach().double()).abs().max().item()) <= 1e-3 * scale


def _channels(e: ExportedBn) -> int:
    return int(e.y.shape[1]) if e.y.dim() >= 2 else -1


def _submodule(model: nn.Module, name: str | None) -> nn.Module | None:
    if not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def conv_f64(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eager conv applied to `x` in float64 (the exact pre-BN value of a folded conv)."""
    params = {k: v.detach().double() for k, v in conv.named_parameters()}
    with torch.no_grad():
        fwd = getattr(conv, "_conv_forward", None)
        if fwd is not None:
            return fwd(x.double(), params["weight"], params.get("bias"))  # type: ignore[no-any-return]
        buffers = {k: v.detach().double() for k, v in conv.named_buffers()}
        return torch.func.functional_call(conv, {**params, **buffers}, (x.double(),))  # type: ignore[no-any-return]


def _is_plain_conv(y: torch.Tensor, conv_out: torch.Tensor, tol: Tolerance) -> bool:
    atol, rtol = resolve(tol, y.dtype)
    return close(y, conv_out, atol, rtol)[1]


def _against_eager(
    exp: ExportedRun, model: nn.Module, inp: load_mod.Inputs, tol: Tolerance, model_name: str
) -> tuple[list[LayerResult], list[Finding], tuple[OutputCheck, ...]]:
    matcher = _Matcher(exp, model, tol)
    outs: list[Any] = []
    handle = model.register_forward_hook(lambda _m, _a, out: outs.append(out))
    try:
        eager = run_eager(
            model,
            inp,
            atol=tol.atol,
            rtol=tol.rtol,
            extensions=[matcher],
            model_name=model_name,
        )
    finally:
        handle.remove()
    layers = list(eager.layers) + matcher.leftovers()
    findings = list(eager.findings)
    if matcher.by_order and any(lr.extra.get("matched_by") == "order" for lr in layers):
        findings.append(
            Finding(
                "matched_by_order",
                "info",
                "the export records no module names; its BN nodes were paired with the eager "
                "layers in execution order (channel counts agree)",
            )
        )
    leaves = [
        t
        for t in torch.utils._pytree.tree_leaves(outs[-1] if outs else ())
        if isinstance(t, torch.Tensor)
    ]
    checks, out_findings = compare_outputs(exp.outputs, leaves, tol)
    return layers, findings + out_findings, checks
