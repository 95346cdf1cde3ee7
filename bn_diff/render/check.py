"""The terminal report of `bn-diff check`: summary table, failing layers, outputs, findings."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bn_diff.check_report import CheckReport
from bn_diff.results import SEVERITY_RANK, LayerResult

from .console import finding_line, fmt, layer_detail

MAX_DETAIL = 3
"""Mismatching layers shown with their per-channel table; the first one is usually the cause."""


def exported_as(lr: LayerResult) -> str:
    """ "bn", "folded into conv1", "missing"."""
    kind = lr.extra.get("exported_as")
    if kind == "folded_conv":
        into = lr.extra.get("folded_into")
        return f"folded: {into}" if into else "folded into a conv"
    return str(kind or "bn")


def status(report: CheckReport, lr: LayerResult) -> Text:
    kind = lr.extra.get("exported_as")
    if kind == "missing":
        return Text("MISSING", style="bn.mismatch")
    if report.layer_ok(lr):
        if not lr.extra.get("checked", True):
            return Text("skipped", style="bn.warn")
        return Text("ok", style="bn.ok")
    if lr.mismatched:
        return Text("MISMATCH", style="bn.mismatch")
    return Text("FAIL", style="bn.mismatch")


def _mode(lr: LayerResult) -> str:
    exp = lr.extra.get("export_mode")
    return lr.info.mode if exp is None or exp == lr.info.mode else f"{lr.info.mode}→{exp}"


def summary_table(report: CheckReport) -> Table:
    t = Table(header_style="bn.head", show_edge=False, pad_edge=False, box=None)
    against = report.against is not None
    # the mode column only when some layer is not plain eval (train, or eager/export differ)
    show_mode = any(_mode(lr) != "eval" for lr in report.layers)
    cols = ["layer", "exported as", *(["mode"] if show_mode else []), "C", "eps", "max |Δ|", "bad"]
    if against:
        cols.append("drift")
    cols.append("")
    for col in cols:
        right = col in ("C", "eps", "max |Δ|", "bad", "drift")
        t.add_column(
            col,
            justify="right" if right else "left",
            no_wrap=col != "exported as",
            overflow="fold" if col == "exported as" else "ellipsis",
        )
    for lr in report.layers:
        checked = lr.extra.get("checked", True)
        eps = lr.extra.get("export_eps", lr.info.eps)
        row: list[str | Text] = [Text(lr.name, style="bn.name"), exported_as(lr)]
        if show_mode:
            row.append(Text(_mode(lr), style="bn.warn" if "train" in _mode(lr) else ""))
        row += [
            str(lr.info.num_features),
            "—" if eps != eps else fmt(eps, 3),
            fmt(lr.max_abs_diff, 2) if checked else "—",
            Text(str(lr.mismatched), style="bn.mismatch" if lr.mismatched else "")
            if checked
            else Text("—"),
        ]
        if against:
            row.append(fmt(lr.extra.get("drift_from_eager"), 2))
        row.append(status(report, lr))
        t.add_row(*row)
    return t


def render_check(report: CheckReport, console: Console) -> None:
    """Print a whole check report."""
    head = Text(f"bn-diff check  {report.exported}", style="bn.head")
    how = report.format + (
        f", {report.exporter} exporter" if report.format == "onnx" and report.exporter else ""
    )
    head.append(f"  ({how})", style="bn.dim")
    if report.against is not None:
        head.append(f"  against  {report.against}")
    head.append(f"  on  {report.input}")
    console.print(head)
    tol = report.tolerance
    pol = (
        f"atol={tol.atol:g}, rtol={tol.rtol:g} (explicit)"
        if tol.explicit
        else (
            "torch.testing's per-dtype atol/rtol + "
            f"{tol.rounding_k:g}·eps·(per-channel rounding scale)"
        )
    )
    console.print(Text(f"tolerance: {pol}", style="bn.dim"))
    if report.against is not None:
        console.print(
            Text(
                "per layer: the eager layer on the export's own input of that layer (float64) vs "
                "the export's output\ndrift: max |export - eager| of the layer's output",
                style="bn.dim",
            )
        )
    else:
        console.print(
            Text(
                "per layer: the BN node recomputed in float64 from its own parameters "
                "vs the runtime",
                style="bn.dim",
            )
        )
    if report.layers:
        console.print()
        console.print(summary_table(report))
    mismatching = [lr for lr in report.layers if lr.mismatched]
    for lr in mismatching[:MAX_DETAIL]:
        console.print()
        layer_detail(console, lr, all_channels=False)
    if len(mismatching) > MAX_DETAIL:
        console.print(
            Text(
                f"… {len(mismatching) - MAX_DETAIL} more mismatching layers not detailed "
                "(--json or --junit has every one)",
                style="bn.dim",
            )
        )
    if report.outputs:
        console.print()
        for o in report.outputs:
            line = Text(
                f"final output {o.index} {list(o.shape)}: max |Δ| {fmt(o.max_abs_diff, 3)} "
                f"(allowed {o.atol:g} + {o.rtol:g}·|eager|)  "
            )
            line.append("ok" if o.ok else "MISMATCH", style="bn.ok" if o.ok else "bn.mismatch")
            console.print(line)
    findings = sorted(report.all_findings, key=lambda f: -SEVERITY_RANK[f.severity])
    if findings:
        console.print()
        for f in findings:
            console.print(finding_line(f))
    console.print()
    console.print(verdict(report))


def verdict(report: CheckReport) -> Text:
    n = len(report.layers)
    t = Text()
    failed = report.failed_layers
    folded, missing = report.count("folded_conv"), report.count("missing")
    parts = []
    if folded:
        parts.append(f"{folded} folded into convs")
    if missing:
        parts.append(f"{missing} missing")
    detail = f" ({', '.join(parts)})" if parts else ""
    if report and n == 0:
        t.append("No BatchNorm layer found: nothing was checked per layer.", style="bn.warn")
        return t
    if report:
        checked = sum(1 for lr in report.layers if lr.extra.get("checked", True))
        what = "the eager model" if report.against is not None else "their float64 recompute"
        if n and not checked:
            t.append(
                f"⚠ nothing was checked: none of the {n} BatchNorm layers{detail} could be "
                "compared (see the warnings above).",
                style="bn.warn",
            )
        elif checked < n:
            t.append(
                f"✔ check passed: {checked} of {n} BatchNorm layers{detail} agree with {what}",
                style="bn.ok",
            )
            t.append(
                f"; {n - checked} could not be checked (see the warnings above).", style="bn.warn"
            )
        else:
            t.append(
                f"✔ check passed: all {n} BatchNorm layers{detail} agree with {what}.",
                style="bn.ok",
            )
        return t
    t.append(
        f"✘ check failed: {len(failed)} of {n} BatchNorm layers fail{detail}", style="bn.mismatch"
    )
    if failed:
        first = failed[0]
        where = exported_as(first)
        t.append(f"; first: {first.name}" + (f" ({where})" if where not in ("bn",) else "") + ".")
    else:
        t.append(".")
    bad_out = [o for o in report.outputs if not o]
    if bad_out:
        t.append(
            f"\n✘ {len(bad_out)} final output(s) differ from the eager model's.",
            style="bn.mismatch",
        )
    failing = report.failing_findings
    if failing:
        t.append(
            f"\n✘ {len(failing)} finding(s) at or above --fail-on {report.fail_on}.",
            style="bn.mismatch",
        )
    return t
