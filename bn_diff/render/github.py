"""GitHub Actions workflow commands for a `check` report (printed when GITHUB_ACTIONS=true).

`::error` for every failing layer, final output and finding at or above --fail-on; `::warning`
for other warnings (skipped checks among them). Messages are escaped as the runner expects.
"""

from __future__ import annotations

from pathlib import Path

from bn_diff.check_report import CheckReport
from bn_diff.results import SEVERITY_RANK

from .junit import finding_text, first_line


def _escape(s: str, prop: bool = False) -> str:
    s = s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        s = s.replace(":", "%3A").replace(",", "%2C")
    return s


def github_annotations(report: CheckReport) -> list[str]:
    """GitHub Actions workflow commands: ::error for each failure, ::warning for other warnings."""
    lines = []
    title = _escape(f"bn-diff check {Path(report.exported).name}", prop=True)
    for lr in report.failed_layers:
        lines.append(f"::error title={title}::{_escape(first_line(report, lr))}")
    for o in report.outputs:
        if not o:
            lines.append(
                f"::error title={title}::"
                + _escape(f"final output {o.index}: max |Δ| {o.max_abs_diff:.3g}")
            )
    floor = SEVERITY_RANK[report.fail_on]
    failing_layers = {lr.name for lr in report.failed_layers}
    for f in report.all_findings:
        fails = SEVERITY_RANK[f.severity] >= floor
        if f.layer in failing_layers:
            continue  # said in the layer's line
        if fails:
            lines.append(f"::error title={title}::{_escape(finding_text(f))}")
        elif f.severity == "warning":
            lines.append(f"::warning title={title}::{_escape(finding_text(f))}")
    return lines
