"""JUnit XML and plain-text failure summaries of a `check` report.

One testcase per layer (failures carry the mismatch text in torch.testing's grammar and the
layer's findings), one per final output, and one for run-wide findings. Layers that could not be
checked are <skipped/>, never passed in silence. Files are written atomically.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from bn_diff.check_report import CheckReport, OutputCheck
from bn_diff.results import SEVERITY_RANK, Finding, LayerResult

from .console import mismatch_lines
from .jsonout import write_atomic


def finding_text(f: Finding) -> str:
    where = f" [{f.layer}]" if f.layer else ""
    fix = f" — {f.fix}" if f.fix else ""
    return f"{f.severity} {f.id}{where}: {f.message}{fix}"


def output_text(o: OutputCheck) -> str:
    return (
        f"final output {o.index} {list(o.shape)}: max |Δ| {o.max_abs_diff:.3g} "
        f"(allowed {o.atol:g} + {o.rtol:g}·|eager|)"
    )


def _layer_title(lr: LayerResult) -> str:
    kind = lr.extra.get("exported_as")
    if kind == "folded_conv" and lr.extra.get("folded_into"):
        return f"{lr.name} (folded into {lr.extra['folded_into']})"
    if kind == "missing":
        return f"{lr.name} (missing from the export)"
    return lr.name


def layer_failure_text(report: CheckReport, lr: LayerResult) -> str:
    """Why a layer fails: the mismatch lines, then its findings at or above --fail-on."""
    lines: list[str] = []
    if lr.mismatched:
        lines += [t.plain for t in mismatch_lines(lr)]
        worst = sorted(lr.channels, key=lambda c: -c.mismatched)[:3]
        chans = ", ".join(
            f"{c.index} ({c.mismatched} bad, max |Δ| {c.max_abs_diff:.3g})"
            for c in worst
            if c.mismatched
        )
        if chans:
            lines.append(f"Worst channels: {chans}")
    floor = SEVERITY_RANK[report.fail_on]
    lines += [finding_text(f) for f in lr.findings if SEVERITY_RANK[f.severity] >= floor]
    return "\n".join(lines)


def first_line(report: CheckReport, lr: LayerResult) -> str:
    floor = SEVERITY_RANK[report.fail_on]
    bad = [f for f in lr.findings if SEVERITY_RANK[f.severity] >= floor]
    if lr.mismatched:
        pct = 100.0 * lr.mismatched / lr.numel if lr.numel else 0.0
        msg = (
            f"{_layer_title(lr)}: {lr.mismatched} / {lr.numel} elements mismatch ({pct:.1f}%), "
            f"max |Δ| {lr.max_abs_diff:.3g}"
        )
        return msg + (f"; {bad[0].id}: {bad[0].message}" if bad else "")
    if bad:
        return f"{_layer_title(lr)}: {bad[0].id}: {bad[0].message}"
    return f"{_layer_title(lr)}: failed"


def failure_summary(report: CheckReport) -> str:
    """Every failure of the report as plain text (what `assert_ok` raises)."""
    out = [f"bn-diff check of {report.exported} failed"]
    for lr in report.failed_layers:
        out.append("")
        out.append(first_line(report, lr))
        out += ["  " + line for line in layer_failure_text(report, lr).splitlines()]
    for o in report.outputs:
        if not o:
            out.append(output_text(o))
    floor = SEVERITY_RANK[report.fail_on]
    run_level = [f for f in report.findings if SEVERITY_RANK[f.severity] >= floor]
    if run_level:
        out.append("")
        out += [finding_text(f) for f in run_level]
    return "\n".join(out)


def to_junit(report: CheckReport) -> str:
    """The report as a JUnit XML document."""
    suite_name = f"bn-diff check {Path(report.exported).name}"
    classname = f"bn-diff.check.{Path(report.exported).name}"
    suite = ET.Element("testsuite", name=suite_name)
    props = ET.SubElement(suite, "properties")
    for k, v in (
        ("exported", report.exported),
        ("format", report.format),
        ("exporter", report.exporter),
        ("against", report.against or ""),
        ("input", report.input),
        ("fail_on", report.fail_on),
    ):
        ET.SubElement(props, "property", name=k, value=v)
    tests = failures = skipped = 0
    for lr in report.layers:
        tests += 1
        case = ET.SubElement(suite, "testcase", classname=classname, name=_layer_title(lr))
        if not report.layer_ok(lr):
            failures += 1
            fail = ET.SubElement(
                case,
                "failure",
                message=first_line(report, lr),
                type="mismatch" if lr.mismatched else "finding",
            )
            fail.text = layer_failure_text(report, lr)
        elif not lr.extra.get("checked", True):
            skipped += 1
            why = "; ".join(f.message for f in lr.findings) or "not checked: " + (
                "folded into a conv; pass --against MODEL"
                if lr.extra.get("exported_as") == "folded_conv"
                else "see findings"
            )
            ET.SubElement(case, "skipped", message=why)
        out = [finding_text(f) for f in lr.findings]
        if out:
            ET.SubElement(case, "system-out").text = "\n".join(out)
    for o in report.outputs:
        tests += 1
        case = ET.SubElement(suite, "testcase", classname=classname, name=f"final output {o.index}")
        if not o:
            failures += 1
            msg = output_text(o)
            ET.SubElement(case, "failure", message=msg, type="mismatch").text = msg
    floor = SEVERITY_RANK[report.fail_on]
    run_level = [f for f in report.findings if SEVERITY_RANK[f.severity] >= floor]
    tests += 1
    case = ET.SubElement(suite, "testcase", classname=classname, name="export findings")
    if run_level:
        failures += 1
        text = "\n".join(finding_text(f) for f in run_level)
        ET.SubElement(
            case, "failure", message=finding_text(run_level[0]), type="finding"
        ).text = text
    if report.findings:
        ET.SubElement(case, "system-out").text = "\n".join(finding_text(f) for f in report.findings)
    for k, n in (("tests", tests), ("failures", failures), ("errors", 0), ("skipped", skipped)):
        suite.set(k, str(n))
    root = ET.Element(
        "testsuites",
        name="bn-diff check",
        tests=str(tests),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
    )
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: CheckReport, path: Path) -> None:
    write_atomic(Path(path), to_junit(report))
