"""The console form of `--reference`: the first divergence up top, then each layer's hypotheses."""

from __future__ import annotations

import textwrap
from typing import Any

from rich.console import Console
from rich.text import Text

from bn_diff.results import Hypothesis, LayerResult, RunReport


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or x != x:
        return "nan"
    return "0" if x == 0 else f"{x:.{digits}g}"


def reference_headline(report: RunReport, console: Console) -> None:
    """Under the title: which referenced layer diverges first (nothing without --reference)."""
    ref: dict[str, Any] | None = report.extra.get("reference")
    if not ref:
        return
    n = len(ref["layers"])
    t = Text(
        f"reference: {ref['source']} ({n} layer{'s' if n != 1 else ''} referenced)", style="bn.dim"
    )
    console.print(t)
    first = ref.get("first_divergent")
    if first is None:
        if n:
            console.print(Text("✔ every referenced layer matches PyTorch's output.", style="bn.ok"))
        return
    lr = next((x for x in report.layers if x.name == first), None)
    line = Text("✘ first divergence from the reference: ", style="bn.mismatch")
    line.append(first, style="bn.name")
    if ref.get("starts") == "before" and lr is not None:
        line.append(f" — starts before the BN, in {lr.extra['reference']['producer']['name']}")
    elif lr is not None and lr.diagnosis:
        top = lr.diagnosis[0]
        line.append(f" — {top.hypothesis}")
        if top.tied_with:
            line.append(" (tied with " + ", ".join(top.tied_with) + ")")
    console.print(line)


def _params(h: Hypothesis) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in h.params.items() if not k.startswith("variant_"))


def _wrapped(text: str, indent: int, width: int, style: str = "") -> list[Text]:
    """Hanging-indented lines, no trailing spaces (stable in snapshots)."""
    pad = " " * indent
    return [Text(pad + line, style=style) for line in textwrap.wrap(text, max(width - indent, 20))]


def diagnosis_lines(lr: LayerResult, width: int = 100) -> list[Text]:
    """The reference comparison and the ranked hypotheses of one layer."""
    info: dict[str, Any] = lr.extra.get("reference", {})
    lines: list[Text] = []
    head = Text()
    head.append(lr.name, style="bn.name")
    head.append("  vs reference")
    if "layout" in info:
        head.append(f" ({info['layout']}): ")
        diff = _fmt(info["max_abs_diff"])
        if info.get("explained_as") == "matches_pytorch":
            head.append(f"matches PyTorch's output (max |Δ| {diff})", style="bn.ok")
        else:
            head.append(f"differs from PyTorch's output by up to {diff}", style="bn.mismatch")
    lines.append(head)
    prod = info.get("producer")
    if prod is not None:
        t = Text(f"  its input {prod['name']}: ")
        if prod["ok"]:
            t.append("matches PyTorch's", style="bn.ok")
            lines.append(t)
        else:
            t.append(f"differs from PyTorch's by up to {_fmt(prod['max_abs_diff'])}", "bn.mismatch")
            lines.append(t)
            lines.append(
                Text("  the divergence starts before this BN; it is diagnosed on your input")
            )
    tied_first = set(lr.diagnosis[0].tied_with) if lr.diagnosis else set()
    for rank, h in enumerate(lr.diagnosis, 1):
        t = Text(f"  {rank}. ")
        style = (
            "bn.ok"
            if h.hypothesis == "matches_pytorch"
            else ("bn.mismatch" if h.hypothesis == "unexplained" else "bn.warn")
        )
        t.append(h.hypothesis, style=style)
        t.append(f"  residual {_fmt(h.max_abs_residual)}")
        p = _params(h)
        if p:
            t.append(f"  {p}")
        if rank > 1 and h.hypothesis in tied_first:
            t.append("  (tie)", style="bn.warn")
        lines.append(t)
        lines += _wrapped(h.explanation, 5, width)
        if h.fix:
            lines += _wrapped(f"fix: {h.fix}", 5, width, "bn.hint")
    if len(lr.diagnosis) > 1:
        n = len(lr.diagnosis)
        lines += _wrapped(
            f"tie: {n} hypotheses reproduce the reference within tolerance; the data cannot tell "
            "them apart.",
            2,
            width,
            "bn.warn",
        )
    return lines


def render_diagnoses(report: RunReport, console: Console) -> None:
    """Each referenced layer's block (nothing without --reference)."""
    for lr in report.layers:
        if "reference" not in lr.extra:
            continue
        console.print()
        for line in diagnosis_lines(lr, console.width):
            console.print(line)
