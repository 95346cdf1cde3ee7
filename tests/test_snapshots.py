"""Terminal output pinned at width 100 without colour. Regenerate: BN_DIFF_UPDATE_SNAPSHOTS=1."""

from __future__ import annotations

import io
import os
from pathlib import Path

import models
import torch
import torch.nn.functional as F
from torch import nn

import bn_diff
from bn_diff.render.console import make_console, render_run

SNAPSHOTS = Path(__file__).parent / "snapshots"


def _render(report: bn_diff.RunReport, **kw: object) -> str:
    buf = io.StringIO()
    console = make_console(file=buf, no_color=True, width=100)
    render_run(report, console, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("BN_DIFF_UPDATE_SNAPSHOTS") or not path.exists():
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), (
        f"snapshot {name} changed; diff it, then regenerate"
    )


def _calibrated_cnn() -> nn.Module:
    torch.manual_seed(0)
    return models.calibrate(models.SmallCNN(), (16, 3, 32, 32))


class EpsTypo(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-3
        )


def test_snapshot_healthy_eval_cnn() -> None:
    net = _calibrated_cnn()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    report = bn_diff.run(
        net.double(), x, model_name="small_cnn.safetensors", input_name="cnn_input.npy"
    )
    check_snapshot("run_small_cnn.txt", _render(report))


def test_snapshot_mismatch_with_channel_table() -> None:
    torch.manual_seed(0)
    bad = EpsTypo(40)
    net = nn.Sequential(nn.Conv2d(3, 40, 1), bad).eval()
    with torch.no_grad():
        bad.running_var.copy_(torch.linspace(0.001, 0.4, 40))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).double()
    report = bn_diff.run(net.double(), x, model_name="eps_typo.pt", input_name="x.pt")
    assert not report
    text = _render(report)
    assert "more channels not shown" in text
    check_snapshot("run_eps_typo.txt", text)


def test_snapshot_forum_case_train_mode() -> None:
    net = models.forum_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double()
    report = bn_diff.run(
        net.double(), x, model_name="forum_model.pt", input_name="forum_input.pt", layers=["bn"]
    )
    check_snapshot("run_forum.txt", _render(report, detail=lambda _lr: True))
