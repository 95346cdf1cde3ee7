"""Findings of `check`: how an exported BN differs from the eager layer (configuration, mode,
parameters), the cheap health checks of an exported BN, and the results of layers that could not
be compared (folded without an eager model, missing, skipped).

Pure functions from an `ExportedBn` (and the eager `BnCall`) to `Finding`s / `LayerResult`s.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from .backends.base import ExportedBn
from .capture import BnCall
from .check_report import OutputCheck
from .compare import close, dtype_name, resolve
from .recompute import as_f64
from .results import Finding, LayerInfo, LayerResult, Tolerance

EXPORT_FIX = "call model.eval() before exporting"


def _f32(x: float) -> float:
    return float(np.float32(x))


def _mode(batch: bool) -> str:
    return "batch statistics (train mode)" if batch else "running statistics (eval mode)"


def config_findings(call: BnCall, e: ExportedBn) -> list[Finding]:
    """eps, momentum, affine, mode and parameters of the export against the eager layer."""
    name = call.name
    out: list[Finding] = []
    if e.eps is not None and _f32(e.eps) != _f32(call.eps):
        out.append(
            Finding(
                "eps_mismatch",
                "error",
                f"the export's epsilon is {e.eps:.6g}, the eager layer's {call.eps:g}",
                "export again from the eager model",
                layer=name,
            )
        )
    if (
        e.momentum is not None
        and call.momentum is not None
        and abs(e.momentum - call.momentum) > 1e-6
    ):
        out.append(
            Finding(
                "momentum_mismatch",
                "warning",
                f"the export's momentum is {e.momentum:.6g} (PyTorch convention), the eager "
                f"layer's {call.momentum:g}; it matters only when the export trains",
                layer=name,
            )
        )
    if call.use_batch_stats != e.training:
        out.append(
            Finding(
                "mode_mismatch",
                "error",
                f"the eager layer normalizes with {_mode(call.use_batch_stats)}, the export with "
                f"{_mode(e.training)}",
                EXPORT_FIX + ", and compare with the eval-mode model"
                if call.use_batch_stats
                else EXPORT_FIX,
                layer=name,
            )
        )
    if e.kind == "bn":
        out += _param_findings(call, e)
    return out


def _param_findings(call: BnCall, e: ExportedBn) -> list[Finding]:
    c = int(e.y.shape[1]) if e.y.dim() >= 2 else int(e.y.numel())
    cpu = torch.device("cpu")
    if e.op != "BatchNormalization" and (call.weight is None) != (e.weight is None):
        return [
            Finding(
                "affine_mismatch",
                "error",
                f"the eager layer has affine={call.weight is not None}, the export "
                f"affine={e.weight is not None}",
                "export again from the eager model",
                layer=call.name,
            )
        ]
    pairs = (
        ("weight", e.weight, call.weight, 1.0),
        ("bias", e.bias, call.bias, 0.0),
        ("running_mean", e.running_mean, call.running_mean_before, 0.0),
        ("running_var", e.running_var, call.running_var_before, 1.0),
    )
    differ: list[str] = []
    worst = 0.0
    for label, ev, cv, fill in pairs:
        if ev is None and cv is None:
            continue
        a = as_f64(ev, c, fill, cpu)
        b = as_f64(cv.cpu() if cv is not None else None, c, fill, cpu)
        if a.shape != b.shape:
            differ.append(label)
            worst = math.inf
            continue
        d = float((a - b).abs().max().item()) if a.numel() else 0.0
        # both sides store float32: anything beyond one float32 rounding is a different value
        if d > 2.0**-23 * float(b.abs().max().item()) + 1e-30:
            differ.append(label)
            worst = max(worst, d)
    if not differ:
        return []
    rm, rv = e.running_mean, e.running_var
    at_init = (
        rm is not None
        and rv is not None
        and bool((rm == 0).all())
        and bool((rv == 1).all())
        and {"running_mean", "running_var"} & set(differ)
    )
    if at_init:
        return [
            Finding(
                "stale_running_stats",
                "error",
                "the export holds the initial running statistics (mean 0, var 1) while the eager "
                "layer has trained ones: it was exported before the running statistics were loaded",
                "load the checkpoint (load_state_dict) before exporting",
                layer=call.name,
            )
        ]
    return [
        Finding(
            "params_mismatch",
            "error",
            f"the export's {', '.join(differ)} differ from the eager layer's (max |Δ| {worst:.3g})",
            "export again from the model you compare with",
            layer=call.name,
        )
    ]


def health_findings(e: ExportedBn, name: str) -> list[Finding]:
    """Cheap checks of one exported BN node that need no eager model."""
    out: list[Finding] = []
    if e.training:
        out.append(
            Finding(
                "export_train_mode",
                "error",
                f"the exported node normalizes with batch statistics ({e.op}"
                + (" with training_mode=1" if e.op == "BatchNormalization" else "")
                + "): its output depends on the whole batch",
                EXPORT_FIX,
                layer=name,
            )
        )
    elif e.source_training:
        out.append(
            Finding(
                "export_mode_changed",
                "warning",
                "the traced model ran this layer in train mode, but the export normalizes with "
                "the running statistics (the exporter switched it to eval mode without saying so)",
                EXPORT_FIX + " so that the eager model and the export agree",
                layer=name,
            )
        )
    rm, rv = e.running_mean, e.running_var
    if rm is None or rv is None or e.training:
        return out
    rm64, rv64 = rm.double(), rv.double()
    if not bool(torch.isfinite(rm64).all() and torch.isfinite(rv64).all()):
        out.append(
            Finding(
                "nonfinite_running_stats", "error", "running statistics hold NaN or Inf", "", name
            )
        )
        return out
    if bool((rv64 < 0).any()):
        n = int((rv64 < 0).sum().item())
        out.append(
            Finding(
                "negative_running_var", "error", f"{n} channel(s) have running_var < 0", "", name
            )
        )
    if bool((rm64 == 0).all()) and bool((rv64 == 1).all()):
        out.append(
            Finding(
                "untrained_running_stats",
                "warning",
                "running statistics are still at their initial values (mean 0, var 1)",
                "load the trained checkpoint before exporting",
                layer=name,
            )
        )
    elif e.eps is not None and bool((rv64 < e.eps).any()):
        n = int((rv64 < e.eps).sum().item())
        out.append(
            Finding(
                "running_var_below_eps",
                "warning",
                f"{n} channel(s) have running_var below eps ({e.eps:g}): their outputs are "
                f"amplified by up to 1/sqrt(eps) = {1 / math.sqrt(e.eps):.0f}x",
                layer=name,
            )
        )
    return out


def placeholder(
    name: str, e: ExportedBn | None, kind: str, tol: Tolerance, info: LayerInfo | None = None
) -> LayerResult:
    """A layer that was listed but not compared (missing, folded without eager, skipped)."""
    if info is None:
        assert e is not None
        y = e.y
        c = int(y.shape[1]) if y.dim() >= 2 else int(y.numel())
        info = LayerInfo(
            name=name,
            type=e.op if e.kind == "bn" else f"BatchNorm folded into {e.op}",
            mode="train" if e.training else "eval",
            stats="batch" if e.training else "running",
            num_features=c,
            eps=e.eps if e.eps is not None else math.nan,
            momentum=e.momentum,
            affine=True,
            track_running_stats=e.running_mean is not None,
            producer=e.conv,
            dtype=dtype_name(y.dtype),
            shape=tuple(int(s) for s in (e.x.shape if e.x is not None else y.shape)),
        )
    atol, rtol = resolve(tol, getattr(torch, info.dtype, torch.float32))
    extra: dict[str, object] = {"exported_as": kind, "checked": False}
    if e is not None:
        extra["exported_node"] = e.node
        if e.kind == "folded_conv":
            extra["folded_into"] = e.conv
    return LayerResult(
        info=info,
        channels=(),
        numel=0,
        mismatched=0,
        max_abs_diff=0.0,
        max_abs_index=(),
        max_rel_diff=0.0,
        max_rel_index=(),
        atol=atol,
        rtol=rtol,
        extra=extra,
    )


def missing(call: BnCall, res: LayerResult, why: str) -> LayerResult:
    f = Finding(
        "layer_missing",
        "error",
        f"{call.name} runs in the eager model but the export has no BatchNorm node for it and no "
        f"conv that carries it{why}",
        "export again from the model you compare with",
        call.name,
    )
    return replace(
        res,
        channels=(),
        numel=0,
        mismatched=0,
        max_abs_diff=0.0,
        max_abs_index=(),
        max_rel_diff=0.0,
        max_rel_index=(),
        train_eval_gap=None,
        running_update=None,
        diagnosis=(),
        findings=(f,),
        extra={"exported_as": "missing", "checked": False},
    )


def skipped(call: BnCall, e: ExportedBn, tol: Tolerance) -> LayerResult:
    lr = placeholder(call.name, e, e.kind, tol)
    f = Finding("bn_check_skipped", "warning", f"not checked: {e.skip_reason}", "", call.name)
    return replace(lr, findings=(f,))


def shape_mismatch(call: BnCall, e: ExportedBn, res: LayerResult, ref: torch.Tensor) -> LayerResult:
    f = Finding(
        "shape_mismatch",
        "error",
        f"the export's output of {call.name} has shape {tuple(e.y.shape)}, the eager layer's "
        f"{tuple(ref.shape)}",
        "check that INPUT has the shape the model was exported with",
        call.name,
    )
    lr = missing(call, res, "")
    return replace(
        lr, findings=(f,), extra={"exported_as": e.kind, "checked": False, "exported_node": e.node}
    )


def compare_outputs(
    exported: list[torch.Tensor], eager: list[torch.Tensor], tol: Tolerance
) -> tuple[tuple[OutputCheck, ...], list[Finding]]:
    checks: list[OutputCheck] = []
    findings: list[Finding] = []
    if len(exported) != len(eager):
        findings.append(
            Finding(
                "output_count_mismatch",
                "error",
                f"the export returns {len(exported)} output(s), the eager model {len(eager)}",
                "export again from the model you compare with",
            )
        )
    for i, (a, b) in enumerate(zip(exported, eager, strict=False)):
        atol, rtol = resolve(tol, b.dtype)
        shape = tuple(int(s) for s in b.shape)
        if tuple(a.shape) != shape:
            checks.append(OutputCheck(i, shape, float("inf"), atol, rtol, False))
            findings.append(
                Finding(
                    "output_shape_mismatch",
                    "error",
                    f"final output {i} has shape {tuple(a.shape)} in the export, {shape} in the "
                    "eager model",
                )
            )
            continue
        d, ok = close(a, b.detach(), atol, rtol)
        checks.append(OutputCheck(i, shape, d, atol, rtol, ok))
        if not ok:
            findings.append(
                Finding(
                    "final_output_mismatch",
                    "error",
                    f"final output {i} {list(shape)} differs from the eager model's by up to "
                    f"{d:.3g} "
                    f"(allowed {atol:g} + {rtol:g}·|eager|)",
                    "the first failing layer is where the difference starts",
                )
            )
    return tuple(checks), findings
