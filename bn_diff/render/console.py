"""The terminal report (rich): summary table, per-layer detail, per-channel table, findings.

Colours are named styles of one Theme; with NO_COLOR, --no-color or a non-TTY there is none.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from ..results import SEVERITY_RANK, ChannelStats, Finding, LayerResult, RunReport
from .diagnosis import reference_headline, render_diagnoses

THEME = Theme(
    {
        "bn.ok": "bold green",
        "bn.mismatch": "bold red",
        "bn.warn": "yellow",
        "bn.info": "cyan",
        "bn.hint": "italic cyan",
        "bn.dim": "dim",
        "bn.name": "bold",
        "bn.num": "",
        "bn.head": "bold",
    }
)

MAX_CHANNEL_ROWS = 16
"""Longer channel lists show the channels with the largest |Δ| (and every mismatching one up to
this many) and say how many were left out."""


def make_console(
    file: IO[str] | None = None, no_color: bool = False, width: int | None = None
) -> Console:
    no_color = no_color or "NO_COLOR" in os.environ
    return Console(
        file=file,
        theme=THEME,
        no_color=no_color,
        color_system=None if no_color else "auto",
        highlight=False,
        width=width,
        soft_wrap=False,
    )


def fmt(x: float | None, digits: int = 4) -> str:
    """Compact number: 4 significant digits, "—" for missing, nan/inf spelled out."""
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def fmt_index(idx: Sequence[int]) -> str:
    return "(" + ", ".join(str(i) for i in idx) + ")"


def _status(lr: LayerResult) -> Text:
    if lr:
        return Text("ok", style="bn.ok")
    if lr.mismatched == 0 and lr.running_update is not None and not lr.running_update:
        return Text("STATS", style="bn.mismatch")
    return Text("MISMATCH", style="bn.mismatch")


def layer_signature(lr: LayerResult) -> str:
    """The layer as PyTorch prints it."""
    i = lr.info
    if i.type == "F.batch_norm":
        return f"F.batch_norm(eps={i.eps:g}, momentum={fmt(i.momentum)})"
    if i.type.startswith("Frozen") or i.momentum is None and not i.track_running_stats:
        return f"{i.type}({i.num_features}, eps={i.eps:g})"
    mom = "None" if i.momentum is None else f"{i.momentum:g}"
    return (
        f"{i.type}({i.num_features}, eps={i.eps:g}, momentum={mom}, affine={i.affine}, "
        f"track_running_stats={i.track_running_stats})"
    )


def summary_table(report: RunReport) -> Table:
    t = Table(title=None, header_style="bn.head", show_edge=False, pad_edge=False, box=None)
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("layer", "left"),
        ("type", "left"),
        ("mode", "left"),
        ("stats", "left"),
        ("producer", "left"),
        ("C", "right"),
        ("eps", "right"),
        ("mom", "right"),
        ("max |Δ|", "right"),
        ("bad", "right"),
        ("gap", "right"),
        ("", "left"),
    )
    for col, just in columns:
        t.add_column(
            col, justify=just, no_wrap=col in ("type", "max |Δ|", "bad", "C", "", "mode", "stats")
        )
    for lr in report.layers:
        i = lr.info
        t.add_row(
            Text(i.name, style="bn.name"),
            i.type,
            Text(i.mode, style="bn.warn" if i.mode == "train" else ""),
            i.stats,
            i.producer or "—",
            str(i.num_features),
            f"{i.eps:g}",
            fmt(i.momentum, 2),
            fmt(lr.max_abs_diff, 2),
            Text(str(lr.mismatched), style="bn.mismatch" if lr.mismatched else ""),
            fmt(lr.train_eval_gap, 3),
            _status(lr),
        )
    return t


def _rows(lr: LayerResult, all_channels: bool) -> tuple[list[ChannelStats], int]:
    chans = list(lr.channels)
    if all_channels or len(chans) <= MAX_CHANNEL_ROWS:
        return chans, 0
    worst = sorted(chans, key=lambda c: (-c.mismatched, -_key(c.max_abs_diff), c.index))
    shown = sorted(worst[:MAX_CHANNEL_ROWS], key=lambda c: c.index)
    return shown, len(chans) - len(shown)


def _key(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def channel_table(lr: LayerResult, all_channels: bool = False) -> tuple[Table, int]:
    t = Table(header_style="bn.head", show_edge=False, pad_edge=False, box=None)
    for col in (
        "ch",
        "batch mean",
        "batch var",
        "run mean",
        "run var",
        "gamma",
        "beta",
        "max |Δ|",
        "bad",
    ):
        t.add_column(col, justify="right", no_wrap=True)
    rows, left_out = _rows(lr, all_channels)
    for c in rows:
        t.add_row(
            str(c.index),
            fmt(c.batch_mean),
            fmt(c.batch_var),
            fmt(c.running_mean),
            fmt(c.running_var),
            fmt(c.gamma),
            fmt(c.beta),
            Text(fmt(c.max_abs_diff, 2), style="bn.mismatch" if c.mismatched else ""),
            Text(str(c.mismatched), style="bn.mismatch" if c.mismatched else ""),
        )
    return t, left_out


def mismatch_lines(lr: LayerResult) -> list[Text]:
    """torch.testing's grammar, plus the minimum tolerance that would pass."""
    pct = 100.0 * lr.mismatched / lr.numel if lr.numel else 0.0
    allow = max((c.tolerance for c in lr.channels), default=0.0)
    extra = f" + rounding ≤ {fmt(allow, 2)}" if allow else ""
    lines = [
        Text(f"Mismatched elements: {lr.mismatched} / {lr.numel} ({pct:.1f}%)"),
        Text(
            f"Greatest absolute difference: {fmt(lr.max_abs_diff)} at index "
            f"{fmt_index(lr.max_abs_index)} (up to {lr.atol:g}{extra} allowed)"
        ),
        Text(
            f"Greatest relative difference: {fmt(lr.max_rel_diff)} at index "
            f"{fmt_index(lr.max_rel_index)} (up to {lr.rtol:g} allowed)"
        ),
        Text(
            f"Minimum tolerance that would pass: atol={fmt(lr.min_atol, 2)} or "
            f"rtol={fmt(lr.min_rtol, 2)}",
            style="bn.hint",
        ),
    ]
    ru = lr.running_update
    if ru is not None and not ru:
        lines.append(
            Text(
                f"Running statistics update differs from (1-k)·old + k·batch with k={ru.momentum_used:g}: "
                f"mean off by {fmt(ru.max_abs_diff_mean, 2)}, var off by {fmt(ru.max_abs_diff_var, 2)}"
                + ("" if ru.num_batches_tracked_ok else ", num_batches_tracked not incremented"),
                style="bn.mismatch",
            )
        )
    return lines


def layer_detail(console: Console, lr: LayerResult, all_channels: bool) -> None:
    i = lr.info
    head = Text()
    head.append(i.name, style="bn.name")
    head.append(f"  {layer_signature(lr)}")
    console.print(head)
    sub = Text("  ")
    sub.append(
        f"{i.mode} mode: normalized with the {i.stats} statistics",
        style="bn.warn" if i.mode == "train" else "",
    )
    if i.producer:
        sub.append(f"; input from {i.producer}", style="bn.dim")
    console.print(sub)
    if not lr:
        for line in mismatch_lines(lr):
            console.print(Text("  ") + line, soft_wrap=True)
    table, left_out = channel_table(lr, all_channels)
    console.print(table)
    if left_out:
        console.print(
            Text(
                f"  … {left_out} more channels not shown (worst {MAX_CHANNEL_ROWS} by mismatches "
                "and |Δ|); --channels all shows every channel",
                style="bn.dim",
            )
        )


def finding_line(f: Finding) -> Text:
    style = {"error": "bn.mismatch", "warning": "bn.warn", "info": "bn.info"}[f.severity]
    t = Text()
    t.append(f"{f.severity:<7} ", style=style)
    t.append(f"{f.id}", style="bn.name")
    if f.layer:
        t.append(f" [{f.layer}]")
    t.append(f": {f.message}")
    if f.fix:
        t.append(f" — {f.fix}", style="bn.hint")
    return t


def findings_table(findings: Sequence[Finding]) -> Table:
    """Severity | what, with the fix on its own line; wrapped lines stay indented."""
    t = Table.grid(padding=(0, 1))
    t.add_column(no_wrap=True)
    t.add_column()
    for f in findings:
        style = {"error": "bn.mismatch", "warning": "bn.warn", "info": "bn.info"}[f.severity]
        body = Text()
        body.append(f.id, style="bn.name")
        if f.layer:
            body.append(f" [{f.layer}]")
        body.append(f": {f.message}")
        if f.fix:
            body.append(f"\nfix: {f.fix}", style="bn.hint")
        t.add_row(Text(f.severity, style=style), body)
    return t


def findings_count(findings: Sequence[Finding]) -> str:
    """ "3 findings: 1 error, 2 warnings" (severities in order, only those present)."""
    n = len(findings)
    parts = []
    for sev in ("error", "warning", "info"):
        k = sum(f.severity == sev for f in findings)
        if k:
            parts.append(f"{k} {sev}" + ("s" if k > 1 and sev != "info" else ""))
    return f"{n} finding{'s' if n != 1 else ''}: " + ", ".join(parts)


def render_run(
    report: RunReport,
    console: Console,
    detail: Callable[[LayerResult], bool] | None = None,
    all_channels: bool = False,
) -> None:
    """Print a whole run report."""
    console.print(Text(f"bn-diff run  {report.model}  on  {report.input}", style="bn.head"))
    tol = report.tolerance
    if tol.explicit:
        console.print(
            Text(f"tolerance: atol={tol.atol:g}, rtol={tol.rtol:g} (explicit)", style="bn.dim")
        )
    else:
        console.print(
            Text(
                "tolerance: torch.testing's per-dtype atol/rtol + "
                f"{tol.rounding_k:g}·eps·(per-channel rounding scale)",
                style="bn.dim",
            )
        )
    reference_headline(report, console)
    if report.layers:
        console.print()
        console.print(summary_table(report))
    shown = [lr for lr in report.layers if not lr or (detail is not None and detail(lr))]
    for lr in shown:
        console.print()
        layer_detail(console, lr, all_channels)
    render_diagnoses(report, console)
    findings = sorted(report.all_findings, key=lambda f: -SEVERITY_RANK[f.severity])
    if findings:
        console.print()
        console.print(findings_table(findings))
    console.print()
    console.print(verdict(report))


def verdict(report: RunReport) -> Text:
    n = len(report.layers)
    bad = [lr for lr in report.layers if not lr]
    train = [lr for lr in report.layers if lr.info.mode == "train"]
    t = Text()
    if not n:
        t.append("No BatchNorm layer ran: nothing to check.", style="bn.warn")
        return t
    if bad:
        t.append(f"✘ {len(bad)} of {n} BatchNorm calls mismatch", style="bn.mismatch")
        t.append(f"; first: {bad[0].name}.")
    else:
        t.append(f"✔ all {n} BatchNorm calls agree with the float64 recompute.", style="bn.ok")
    if train:
        gap = max((lr.train_eval_gap or 0.0 for lr in train), default=0.0)
        t.append(
            f"\n  {len(train)} ran in train mode (batch statistics); in eval mode "
            f"{'its' if len(train) == 1 else 'their'} output would move by up to {fmt(gap, 3)}.",
            style="bn.warn",
        )
    if report.all_findings:
        worst = max(SEVERITY_RANK[f.severity] for f in report.all_findings)
        style = ("bn.info", "bn.warn", "bn.mismatch")[worst]
        t.append(f"\n  {findings_count(report.all_findings)} (listed above).", style=style)
    failing = report.failing_findings
    if failing:
        t.append(
            f"\n✘ {len(failing)} finding(s) at or above --fail-on {report.fail_on}.",
            style="bn.mismatch",
        )
    if report.reference_ok is False:
        first = report.extra.get("reference", {}).get("first_divergent")
        t.append(
            f"\n✘ the reference diverges from PyTorch (first at {first}).", style="bn.mismatch"
        )
    return t


def render_error(console: Console, message: str, hint: str | None) -> None:
    t = Text()
    t.append("error: ", style="bn.mismatch")
    t.append(message)
    if hint:
        t.append(f" — {hint}", style="bn.hint")
    console.print(t, soft_wrap=True)  # one line, however long: scripts grep it


@contextmanager
def progress_bar(
    enabled: bool = True, delay: float = 0.5
) -> Iterator[Callable[[int, int, str], None]]:
    """A transient progress bar on stderr, shown only on a TTY once the run takes over `delay`s."""
    state: dict[str, Any] = {"bar": None, "task": None, "t0": time.monotonic()}
    active = enabled and sys.stderr.isatty() and "NO_COLOR" not in os.environ

    def update(done: int, total: int, name: str) -> None:
        if not active:
            return
        if state["bar"] is None:
            if time.monotonic() - state["t0"] < delay:
                return
            bar = Progress(
                TextColumn("[bn.dim]checking BN layers"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} {task.description}"),
                console=Console(stderr=True, theme=THEME),
                transient=True,
            )
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task("", total=max(total, done))
        bar = state["bar"]
        bar.update(state["task"], completed=done, total=max(total, done), description=name)

    try:
        yield update
    finally:
        if state["bar"] is not None:
            state["bar"].stop()


def render_layers(rows: list[dict[str, Any]], model: str, console: Console) -> None:
    """`bn-diff layers`: one row per conv / norm layer with its configuration."""
    console.print(Text(f"bn-diff layers  {model}", style="bn.head"))
    if not rows:
        console.print(Text("No conv or normalization layers.", style="bn.warn"))
        return
    t = Table(header_style="bn.head", show_edge=False, pad_edge=False, box=None)
    t.add_column("layer", no_wrap=True)
    t.add_column("type", no_wrap=True)
    t.add_column("configuration")
    for r in rows:
        cfg = ", ".join(f"{k}={_cfg(v)}" for k, v in r["config"].items())
        style = "bn.warn" if r["config"].get("training") and r["kind"] == "batchnorm" else ""
        t.add_row(Text(r["name"], style="bn.name"), r["type"], Text(cfg, style=style))
    console.print(t)
    n_bn = sum(r["kind"] == "batchnorm" for r in rows)
    n_train = sum(r["kind"] == "batchnorm" and bool(r["config"]["training"]) for r in rows)
    console.print(
        Text(
            f"{n_bn} BatchNorm layers ({n_train} in train mode), "
            f"{sum(r['kind'] == 'conv' for r in rows)} convs."
        )
    )


def _cfg(v: Any) -> str:
    if isinstance(v, list):
        return "(" + ", ".join(str(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
