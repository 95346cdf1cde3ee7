"""`run --reference`: diagnose referenced layers inside the hook, then name the first divergence.

`ReferenceCheck` is a pipeline Extension: for each BN call whose output (or whose producing conv's
output) the reference holds, it compares and diagnoses while the call's tensors are alive and puts
the ranked hypotheses into `LayerResult.diagnosis`. Layers without a reference cost one dict lookup;
without `--reference` there is no extension at all. `summarize` adds the run-level answer: the first
referenced layer, in execution order, whose output differs from PyTorch's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import pipeline
from .capture import CONV_TYPES, BnCall, named_modules
from .compare import close, resolve
from .diagnose import diagnose
from .errors import UsageError
from .loadsafe import display
from .reference import Reference, check_names, layouts, load_reference
from .results import Finding, Hypothesis, LayerResult, RunReport, Tolerance


def _order(run: tuple[str, torch.Tensor, tuple[Hypothesis, ...]]) -> tuple[int, int, float]:
    """Best reading of an ambiguous layout: PyTorch's formula, then anything explained."""
    top = run[2][0]
    return (
        top.hypothesis == "unexplained",
        top.hypothesis != "matches_pytorch",
        top.max_abs_residual,
    )


class ReferenceCheck:
    """The Extension: referenced layers get a comparison and a diagnosis."""

    def __init__(self, ref: Reference, tol: Tolerance) -> None:
        self.ref = ref
        self.tol = tol
        self.used: set[str] = set()

    def _key(self, name: str | None) -> str | None:
        if name is None:
            return None
        if name in self.ref.tensors:
            return name
        return name[:-2] if name.endswith("#1") and name[:-2] in self.ref.tensors else None

    def __call__(self, call: BnCall, res: LayerResult) -> LayerResult:
        out_key, in_key = self._key(call.name), self._key(call.producer)
        if out_key is None and in_key is None:
            return res
        x = call.x.detach()
        own_input = True
        info: dict[str, Any] = {}
        if in_key is not None:
            self.used.add(in_key)
            atol, rtol = resolve(self.tol, x.dtype)
            readings = layouts(
                self.ref.tensors[in_key], tuple(x.shape), self.ref.layout, in_key, "input"
            )
            scored = [(lay, t, *close(t.to(x.device), x, atol, rtol)) for lay, t in readings]
            lay, x_ref, diff, ok = min(scored, key=lambda r: r[2])
            info["producer"] = {"name": in_key, "layout": lay, "max_abs_diff": diff, "ok": ok}
            if not ok:
                x, own_input = x_ref.to(x.device), False
        hyps: tuple[Hypothesis, ...] = ()
        if out_key is not None:
            self.used.add(out_key)
            y = call.y.detach()
            runs = [
                (lay, t, self._diagnose(call, x, t, own_input))
                for lay, t in layouts(
                    self.ref.tensors[out_key], tuple(y.shape), self.ref.layout, out_key
                )
            ]
            lay, y_ref, hyps = min(runs, key=_order)
            atol, rtol = resolve(self.tol, y.dtype)
            diff, _ = close(y_ref.to(y.device), y, atol, rtol)
            info.update(
                layout=lay, max_abs_diff=diff, explained_as=hyps[0].hypothesis if hyps else None
            )
            bn_matches = any(h.hypothesis == "matches_pytorch" for h in hyps)
        else:
            bn_matches = True
        upstream = "producer" in info and not info["producer"]["ok"]
        info["diverges"] = upstream or not bn_matches
        info["starts"] = "before" if upstream else ("bn" if not bn_matches else None)
        return replace(res, diagnosis=hyps, extra={**res.extra, "reference": info})

    def _diagnose(
        self, call: BnCall, x: torch.Tensor, y_ref: torch.Tensor, own_input: bool
    ) -> tuple[Hypothesis, ...]:
        return diagnose(
            x,
            y_ref.to(x.device),
            gamma=call.weight,
            beta=call.bias,
            running_mean=call.running_mean_before,
            running_var=call.running_var_before,
            eps=call.eps,
            momentum=call.momentum,
            num_batches_tracked=call.num_batches_tracked_before,
            use_batch_stats=call.use_batch_stats,
            y_torch=call.y.detach() if own_input else None,
            tol=self.tol,
        )


def summarize(report: RunReport, check: ReferenceCheck) -> RunReport:
    """Name the first referenced layer (execution order) that diverges; list unused keys."""
    refd = [lr for lr in report.layers if "reference" in lr.extra]
    first = next((lr for lr in refd if lr.extra["reference"]["diverges"]), None)
    findings: list[Finding] = []
    summary: dict[str, Any] = {
        "source": check.ref.source,
        "layers": [lr.name for lr in refd],
        "first_divergent": None if first is None else first.name,
        "starts": None,
    }
    if first is not None:
        info = first.extra["reference"]
        summary["starts"] = info["starts"]
        if info["starts"] == "before":
            prod = info["producer"]
            where = (
                f"before the BN: the output of {prod['name']} (its input) already differs by "
                f"{prod['max_abs_diff']:.3g}"
            )
        else:
            where = "in the BN itself"
        top = first.diagnosis[0] if first.diagnosis else None
        because = ""
        if top is not None:
            because = f"; best explanation: {top.hypothesis}"
            if top.tied_with:
                because += " (tied with " + ", ".join(top.tied_with) + ")"
        findings.append(
            Finding(
                "reference_diverges",
                "error",
                f"the first layer whose output differs from the reference is {first.name}; the "
                f"divergence starts {where}{because}",
                top.fix
                if top is not None and info["starts"] == "bn"
                else "compare the layers before it (add their outputs to the reference)",
                first.name,
            )
        )
    elif refd:
        findings.append(
            Finding(
                "reference_matches",
                "info",
                f"all {len(refd)} referenced layers match PyTorch's output within tolerance",
            )
        )
    unused = sorted(set(check.ref.tensors) - check.used)
    if unused:
        findings.append(
            Finding(
                "reference_unused",
                "warning",
                "reference keys that matched no checked BN call or its producing conv: "
                + ", ".join(unused[:8])
                + (" ..." if len(unused) > 8 else ""),
                "check the names, --layer, and that those layers run in the forward",
            )
        )
    summary["unused"] = unused
    return replace(
        report,
        findings=report.findings + tuple(findings),
        extra={**report.extra, "reference": summary},
        reference_ok=first is None if refd else None,
    )


def run_files_with_reference(
    model_path: Path,
    input_path: Path | None,
    *,
    reference: Path,
    reference_layer: str | None = None,
    reference_layout: str = "auto",
    **kwargs: Any,
) -> RunReport:
    """`bn-diff run MODEL INPUT --reference FILE`: `pipeline.run` plus the reference check.

    Other keyword options are those of `pipeline.run_files`.
    """
    ref = load_reference(reference, reference_layer, reference_layout)
    model, inp = pipeline.load_model_and_inputs(
        model_path, input_path, **pipeline.split_load_options(kwargs)
    )
    bns = pipeline.bn_layer_names(model)
    convs = [n for n, m in named_modules(model) if isinstance(m, CONV_TYPES)]
    if reference_layer is not None and reference_layer.split("#")[0] not in bns + convs:
        import difflib

        close = difflib.get_close_matches(reference_layer, bns, n=3, cutoff=0.5)
        raise UsageError(
            f"--reference-layer {reference_layer!r} is not a BatchNorm or conv layer of the model",
            ("did you mean " + ", ".join(close) + "?")
            if close
            else "`bn-diff layers MODEL` lists them",
        )
    check_names(ref, bns, convs)
    check = ReferenceCheck(ref, pipeline.make_tolerance(kwargs.get("atol"), kwargs.get("rtol")))
    extensions = [*kwargs.pop("extensions", ()), check]
    report = pipeline.run(
        model,
        inp,
        model_name=display(model_path),
        input_name=inp.source,
        extensions=extensions,
        **kwargs,
    )
    return summarize(report, check)
