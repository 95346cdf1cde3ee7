"""Snapshot of the console report for the forum case (width 100, no colour).

Regenerate after an intended change: BN_DIFF_UPDATE_SNAPSHOTS=1 pytest tests/test_health_snapshot.py
"""

from __future__ import annotations

import io
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from bn_diff.pipeline import run
from bn_diff.render.console import make_console, render_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "health_forum_frozen.txt"


def render(report: object) -> str:
    buf = io.StringIO()
    render_run(report, make_console(file=buf, no_color=True, width=100))  # type: ignore[arg-type]
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def test_forum_frozen_console_snapshot() -> None:
    forum = models.forum_net()  # named conv and bn, as in DESIGN.md, whatever examples/ calls them
    net = nn.Sequential(OrderedDict(conv=forum[0], bn=forum[1]))
    net.bn.requires_grad_(False)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    text = render(
        run(net, x, model_name="forum_model.pt", input_name="forum_input.pt", fail_on="warning")
    )
    if os.environ.get("BN_DIFF_UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert text == SNAPSHOT.read_text(encoding="utf-8")
