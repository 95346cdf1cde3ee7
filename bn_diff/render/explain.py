"""`bn-diff explain` in the terminal (rich): one element of one BN layer, read top to bottom.

Sections: the layer and what its mode means; the channel's statistics; the element from x to y with
PyTorch's output; "If your number is different" (the usual misreadings); side effects and how to
really freeze a BN layer.
"""

from __future__ import annotations

import math

from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from bn_diff.explain_results import Alternative, ChannelPart, ElementPart, Explanation, LayerPart

INDENT = 2


def num(x: float | None) -> str:
    """Six significant digits: enough to find one's own number, few enough to read."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.6g}"


def small(x: float) -> str:
    """A difference: two significant digits."""
    return "0" if x == 0 else f"{x:.2g}"


def operand(x: float) -> str:
    """A number as the right-hand operand of − · +: negatives in parentheses."""
    return f"({num(x)})" if x < 0 else num(x)


def _indent(*items: Text | Table) -> Padding:
    return Padding(Group(*items), (0, 0, 0, INDENT), expand=False)


def _table() -> Table:
    return Table(show_header=False, show_edge=False, pad_edge=False, box=None, padding=(0, 2, 0, 0))


def _heading(text: str, extra: str = "") -> Text:
    t = Text(text, style="bn.head")
    if extra:
        t.append(f"  {extra}", style="bn.dim")
    return t


def layer_section(lay: LayerPart) -> list[Text | Padding]:
    head = _heading(f"Layer {lay.name}", f"(input from {lay.producer})" if lay.producer else "")
    prefix = f"{lay.mode} mode"
    meaning = Text(lay.meaning)
    if lay.meaning.startswith(prefix):
        meaning.stylize("bn.warn" if lay.mode == "train" else "bn.name", 0, len(prefix))
    return [head, _indent(Text(lay.printed), meaning)]


def channel_section(lay: LayerPart, ch: ChannelPart) -> list[Text | Padding]:
    batch = lay.stats == "batch"
    used, unused = "used to normalize", f"not used in {lay.mode} mode"
    t = _table()
    t.add_column(no_wrap=True, style="bn.name")
    t.add_column(no_wrap=True)
    t.add_column(justify="right", no_wrap=True)
    t.add_column(style="bn.dim")
    t.add_row("mean_B", "batch mean, Σx / m", num(ch.batch_mean), used if batch else unused)
    t.add_row(
        "var_B",
        "batch variance, Σ(x − mean_B)² / m",
        num(ch.batch_var),
        "biased (÷ m); " + (used if batch else "not used"),
    )
    t.add_row(
        "var_U",
        f"unbiased variance, var_B · {lay.m}/{lay.m - 1}",
        num(ch.batch_var_unbiased),
        "what running_var accumulates" if lay.track_running_stats else "",
    )
    when = "before this forward" if lay.mode == "train" else "as saved in the layer"
    note = unused if batch else used
    if ch.running_mean is not None:
        t.add_row("running_mean", when, num(ch.running_mean), note)
        t.add_row("running_var", when, num(ch.running_var), note)
    else:
        t.add_row("running stats", "none (track_running_stats=False)", "—", "")
    t.add_row("eps", "added to the variance", num(ch.eps), "")
    var = "var_B" if batch else "running_var"
    t.add_row("std", f"sqrt({var} + eps)", num(ch.std_used), "")
    fixed = "" if lay.affine else "affine=False"
    t.add_row("γ", "weight", num(ch.gamma), fixed)
    t.add_row("β", "bias", num(ch.beta), fixed)
    head = _heading(f"Channel {ch.index} of {ch.num_channels}", f"m = {lay.m_expr} values")
    return [head, _indent(t)]


def element_section(lay: LayerPart, ch: ChannelPart, el: ElementPart) -> list[Text | Padding]:
    mean = "mean_B" if lay.stats == "batch" else "running_mean"
    var = "var_B" if lay.stats == "batch" else "running_var"
    t = _table()
    t.add_column(no_wrap=True)
    t.add_column()
    t.add_row("x", num(el.x))
    t.add_row(f"x − {mean}", f"{num(el.x)} − {operand(ch.mean_used)} = {num(el.centered)}")
    t.add_row(
        f"÷ sqrt({var} + eps) = x̂", f"{num(el.centered)} / {num(ch.std_used)} = {num(el.x_hat)}"
    )
    t.add_row(
        "γ·x̂ + β = y",
        f"{num(ch.gamma)} · {operand(el.x_hat)} + {operand(ch.beta)} = {num(el.y_by_hand)}",
    )
    verdict = Text()
    verdict.append(num(el.y_pytorch), style="bn.name")
    d, allowed = small(abs(el.difference)), small(el.allowed)
    if el:
        verdict.append(f"  ✔ PyTorch agrees: |Δ| = {d} ≤ {allowed}", style="bn.ok")
    else:
        verdict.append(f"  ✘ PyTorch disagrees: |Δ| = {d} > {allowed}", style="bn.mismatch")
    t.add_row("PyTorch's output", verdict)
    idx = "(" + ", ".join(str(i) for i in el.index) + ")"
    return [_heading(f"Element {idx}", f"dtype {lay.dtype}"), _indent(t)]


def _reading(a: Alternative, labels: dict[str, str]) -> Text:
    t = Text(a.label)
    if a.note:
        t.append(f" — {a.note}", style="bn.dim")
    t.append("\n")
    t.append(a.formula, style="bn.dim")
    if a.matches_pytorch:
        t.append("   = PyTorch's output here", style="bn.ok")
    elif a.tied_with:
        t.append("   same as: " + ", ".join(labels[i] for i in a.tied_with), style="bn.dim")
    return t


def alternatives_section(exp: Explanation) -> list[Text | Padding]:
    t = _table()
    t.add_column(justify="right", no_wrap=True)
    t.add_column()
    labels = {a.id: a.label.split(":")[0] for a in exp.alternatives}
    for a in exp.alternatives:
        t.add_row(Text(num(a.value), style="bn.name"), _reading(a, labels))
    head = _heading(
        "If your number is different",
        f"PyTorch: {num(exp.element.y_pytorch)}; this element under the usual misreadings",
    )
    return [head, _indent(t)]


def side_effects_section(exp: Explanation) -> list[Text | Padding]:
    se = exp.side_effects
    out: list[Text | Padding] = [_heading("Side effects of this forward", f"{exp.layer.mode} mode")]
    body: list[Text | Table] = []
    if se.changes:
        t = _table()
        t.add_column(no_wrap=True)
        t.add_column(no_wrap=True)
        t.add_column(style="bn.dim")
        for c in se.changes:
            agree = abs(c.after - c.expected) <= 1e-6 * max(1.0, abs(c.expected))
            by_hand = "" if agree else f"  ✘ by hand {num(c.expected)}"
            t.add_row(c.name, f"{num(c.before)} → {num(c.after)}", c.formula + by_hand)
        body.append(t)
    body.extend(Text(n, style="bn.warn" if se.updates_running_stats else "") for n in se.notes)
    out.append(_indent(*body))
    out.append(Text())
    out.append(_heading("How to really freeze a BatchNorm layer"))
    f = _table()
    f.add_column(no_wrap=True)
    f.add_column()
    for how, effect in se.freeze:
        line = Text(how, style="bn.name")
        line.append(f": {effect}", style="")
        f.add_row("•", line)
    out.append(_indent(f, Text(se.construction_note, style="bn.hint")))
    return out


def render_explain(exp: Explanation, console: Console, note: str | None = None) -> None:
    """Print an explanation, top to bottom."""
    console.print(Text(f"bn-diff explain  {exp.model}  on  {exp.input}", style="bn.head"))
    if note:
        console.print(Text(note, style="bn.dim"))
    sections = (
        layer_section(exp.layer),
        channel_section(exp.layer, exp.channel),
        element_section(exp.layer, exp.channel, exp.element),
        alternatives_section(exp),
        side_effects_section(exp),
    )
    for sec in sections:
        console.print()
        for item in sec:
            console.print(item)
