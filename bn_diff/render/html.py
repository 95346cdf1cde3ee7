"""`bn-diff run --html PATH`: the report as one self-contained HTML page.

No network, no CDN, no JavaScript: styles are inline CSS and the plots inline SVG (render/svg.py),
so the file renders anywhere, offline, and can be attached to a CI run. Per layer: batch vs running
mean and variance per channel (the drift is easier to see than to read) and the per-channel error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from pathlib import Path

from bn_diff.results import SEVERITY_RANK, Finding, LayerResult, RunReport

from .console import findings_count, fmt, layer_signature
from .jsonout import write_atomic
from .svg import Series, plot

BATCH, RUNNING, ERROR, LIMIT = "#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c"
OPEN_ALL_UP_TO = 12
"""Reports with at most this many layers show every layer expanded; larger ones expand only the
layers with a mismatch or a finding."""

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;
max-width:1100px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} h3{font-size:15px;margin:0}
.meta{color:#555;font-size:13px} code{font-size:12px}
.verdict{padding:10px 14px;border-radius:6px;margin:14px 0;font-weight:600}
.ok{background:#e6f4ea;color:#185c2c} .bad{background:#fdecea;color:#8a1c13}
.warnbox{background:#fff4e0;color:#7a4b00}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} th{background:#f6f6f6} td.n{text-align:right;
font-variant-numeric:tabular-nums}
.sev{font-weight:700;text-transform:uppercase;font-size:11px;padding:1px 5px;border-radius:3px}
.sev-error{background:#d62728;color:#fff} .sev-warning{background:#f0ad4e;color:#222}
.sev-info{background:#5bc0de;color:#04313d} .fix{color:#335;font-style:italic}
details{border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px 12px}
summary{cursor:pointer} .sig{color:#555;font-size:12px}
.status-ok{color:#185c2c;font-weight:700} .status-bad{color:#b3261e;font-weight:700}
svg.plot{display:block;margin:6px 0} .pt{font-size:12px;font-weight:600}
.tk{font-size:10px;fill:#555} .lg{font-size:11px;fill:#333} .pn{font-size:11px;fill:#777}
.grid{stroke:#eee}
"""


def render_html(report: RunReport) -> str:
    """The whole page as a string."""
    title = f"bn-diff run — {report.model}"
    body = [
        f"<h1>bn-diff run</h1><div class='meta'>model <code>{escape(report.model)}</code> on "
        f"<code>{escape(report.input)}</code> · mode {escape(report.mode)} · device "
        f"{escape(report.device)} · {escape(_tolerance(report))}</div>",
        _verdict(report),
        _findings_section(report),
        _summary_table(report),
        "<h2>Layers</h2>",
    ]
    many = len(report.layers) > OPEN_ALL_UP_TO
    for k, lr in enumerate(report.layers):
        body.append(_layer_section(k, lr, open_=not many or not lr or bool(lr.findings)))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_html(report: RunReport, path: Path | str) -> None:
    """Write the page atomically (readers never see half a file)."""
    write_atomic(Path(path), render_html(report))


def _tolerance(report: RunReport) -> str:
    tol = report.tolerance
    if tol.explicit:
        return f"tolerance atol={tol.atol:g}, rtol={tol.rtol:g} (explicit)"
    return f"tolerance: per-dtype atol/rtol + {tol.rounding_k:g}·eps·rounding scale per channel"


def _verdict(report: RunReport) -> str:
    n = len(report.layers)
    bad = [lr for lr in report.layers if not lr]
    train = [lr for lr in report.layers if lr.info.mode == "train"]
    lines = []
    if not n:
        lines.append(("warnbox", "No BatchNorm layer ran: nothing to check."))
    elif bad:
        lines.append(
            ("bad", f"✘ {len(bad)} of {n} BatchNorm calls mismatch; first: {bad[0].name}.")
        )
    else:
        lines.append(("ok", f"✔ all {n} BatchNorm calls agree with the float64 recompute."))
    if train:
        gap = max((lr.train_eval_gap or 0.0 for lr in train), default=0.0)
        lines.append(
            (
                "warnbox",
                f"{len(train)} ran in train mode (normalized with batch statistics); in eval mode "
                f"their outputs would move by up to {fmt(gap, 3)}.",
            )
        )
    found = report.all_findings
    if found:
        worst = max(SEVERITY_RANK[f.severity] for f in found)
        lines.append((("ok", "warnbox", "bad")[worst], findings_count(found) + "."))
    if report.failing_findings:
        lines.append(
            (
                "bad",
                f"✘ {len(report.failing_findings)} finding(s) at or above --fail-on "
                f"{report.fail_on}.",
            )
        )
    return "".join(f"<div class='verdict {cls}'>{escape(text)}</div>" for cls, text in lines)


def _anchor(k: int) -> str:
    return f"layer-{k}"


def _findings_rows(
    findings: Sequence[Finding], anchors: dict[str, int], with_layer: bool = True
) -> str:
    rows = []
    for f in sorted(findings, key=lambda f: -SEVERITY_RANK[f.severity]):
        layer = ""
        if f.layer is not None:
            k = anchors.get(f.layer)
            name = escape(f.layer)
            layer = f"<a href='#{_anchor(k)}'>{name}</a>" if k is not None else name
        fix = f"<div class='fix'>fix: {escape(f.fix)}</div>" if f.fix else ""
        rows.append(
            f"<tr class='finding' data-id='{escape(f.id)}'><td><span class='sev "
            f"sev-{f.severity}'>{f.severity}</span></td><td><code>{escape(f.id)}</code></td>"
            + (f"<td>{layer}</td>" if with_layer else "")
            + f"<td>{escape(f.message)}{fix}</td></tr>"
        )
    layer_th = "<th>layer</th>" if with_layer else ""
    return (
        f"<table><tr><th>severity</th><th>id</th>{layer_th}<th>what</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _findings_section(report: RunReport) -> str:
    found = report.all_findings
    if not found:
        return "<h2>Findings</h2><p>None.</p>"
    anchors = {lr.name: k for k, lr in enumerate(report.layers)}
    return f"<h2>Findings ({len(found)})</h2>" + _findings_rows(found, anchors)


def _summary_table(report: RunReport) -> str:
    if not report.layers:
        return ""
    head = (
        "<tr><th>layer</th><th>type</th><th>mode</th><th>stats</th><th>producer</th><th>C</th>"
        "<th>eps</th><th>mom</th><th>max |Δ|</th><th>bad</th><th>gap</th><th>findings</th>"
        "<th></th></tr>"
    )
    rows = []
    for k, lr in enumerate(report.layers):
        i = lr.info
        status = "<span class='status-ok'>ok</span>" if lr else "<span class='status-bad'>✘</span>"
        rows.append(
            f"<tr><td><a href='#{_anchor(k)}'>{escape(i.name)}</a></td><td>{escape(i.type)}</td>"
            f"<td>{i.mode}</td><td>{i.stats}</td><td>{escape(i.producer or '—')}</td>"
            f"<td class='n'>{i.num_features}</td><td class='n'>{i.eps:g}</td>"
            f"<td class='n'>{fmt(i.momentum, 2)}</td><td class='n'>{fmt(lr.max_abs_diff, 2)}</td>"
            f"<td class='n'>{lr.mismatched}</td><td class='n'>{fmt(lr.train_eval_gap, 3)}</td>"
            f"<td class='n'>{len(lr.findings)}</td><td>{status}</td></tr>"
        )
    return "<h2>Summary</h2><table>" + head + "".join(rows) + "</table>"


def _layer_section(k: int, lr: LayerResult, open_: bool) -> str:
    i = lr.info
    status = "ok" if lr else f"{lr.mismatched} of {lr.numel} elements mismatch"
    head = (
        f"<summary><h3 style='display:inline'>{escape(i.name)}</h3> "
        f"<span class='sig'>{escape(layer_signature(lr))} · {i.mode} mode, {i.stats} statistics"
        + (f" · input from {escape(i.producer)}" if i.producer else "")
        + f" · <span class='{'status-ok' if lr else 'status-bad'}'>{escape(status)}</span>"
        "</span></summary>"
    )
    facts = (
        f"<div class='meta'>max |Δ| {fmt(lr.max_abs_diff)} at {escape(str(lr.max_abs_index))} "
        f"(atol {lr.atol:g}, rtol {lr.rtol:g}) · minimum passing tolerance atol="
        f"{fmt(lr.min_atol, 2)} or rtol={fmt(lr.min_rtol, 2)}"
        + (
            f" · train/eval gap {fmt(lr.train_eval_gap, 3)}"
            if lr.train_eval_gap is not None
            else ""
        )
        + "</div>"
    )
    findings = _findings_rows(lr.findings, {}, with_layer=False) if lr.findings else ""
    plots = "".join(layer_plots(lr))
    return (
        f"<details id='{_anchor(k)}' class='layer'{' open' if open_ else ''}>{head}{facts}"
        f"{findings}{plots}</details>"
    )


def layer_plots(lr: LayerResult) -> list[str]:
    """Three SVG plots: mean, variance (batch vs running), and the per-channel error."""
    ch = lr.channels
    used = f"this call normalized with {lr.info.stats} statistics"
    has_running = any(c.running_mean is not None for c in ch)
    mean_series = [Series("batch mean", [c.batch_mean for c in ch], BATCH)]
    var_series = [Series("batch var", [c.batch_var for c in ch], BATCH)]
    if has_running:
        mean_series.append(Series("running mean", [c.running_mean for c in ch], RUNNING))
        var_series.append(Series("running var", [c.running_var for c in ch], RUNNING))
    note = "" if has_running else "no running statistics"
    var_values = [v for s in var_series for v in s.values]
    errors = [c.max_abs_diff for c in ch]
    limit = [lr.atol + c.tolerance for c in ch]
    err_note = "" if any(_pos(e) for e in errors) else "|Δ| = 0 in every channel"
    return [
        plot(f"mean per channel — {used}", mean_series, note=note),
        plot(f"variance per channel — {used}", var_series, log=_wants_log(var_values), note=note),
        plot(
            "max |PyTorch − float64 by hand| per channel (red: channel has mismatches)",
            [
                Series(
                    "max |Δ|",
                    errors,
                    ERROR,
                    bars=True,
                    highlight=[c.mismatched > 0 for c in ch],
                ),
                Series("atol + rounding allowance", limit, LIMIT, dash="4 3"),
            ],
            log=True,
            note=err_note,
        ),
    ]


def _pos(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def _wants_log(values: Sequence[float | None]) -> bool:
    """Log scale when every value is positive and they span more than two decades."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 100
