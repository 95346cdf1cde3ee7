"""Pairing exported BN nodes with eager calls: a BN module called twice, a functional
F.batch_norm in the model's own forward, and an export that records no names at all."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from check_helpers import export, quiet
from torch import nn

import bn_diff


class Shared(nn.Module):
    """conv -> bn -> relu -> bn (the same module again) -> F.batch_norm(eps=1e-3, no bias)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.rand(4) + 0.5)
        self.register_buffer("rm", torch.randn(4) * 0.1)
        self.register_buffer("rv", torch.rand(4) + 0.5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.bn(self.conv(x))))
        return F.batch_norm(y, self.rm, self.rv, self.w, None, False, 0.1, 1e-3)


NAMES = ["bn", "bn#2", "(model):F.batch_norm"]


@pytest.fixture(scope="module")
def shared() -> tuple[nn.Module, torch.Tensor]:
    return Shared().eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("kind", "first"),
    [("noopt", "bn"), ("dynamo", "folded_conv"), ("legacy_bn", "bn"), ("legacy", "folded_conv")],
)
def test_repeated_and_functional_bn_pair_up_in_onnx(
    shared: tuple[nn.Module, torch.Tensor], tmp_path: Path, kind: str, first: str
) -> None:
    model, x = shared
    report = bn_diff.check(export(model, x, tmp_path / "m.onnx", kind), x, against=model)
    assert report, report.to_json()
    assert [lr.name for lr in report.layers] == NAMES
    assert [lr.extra["exported_as"] for lr in report.layers] == [first, "bn", "bn"]


def test_repeated_and_functional_bn_pair_up_in_torch_export(
    shared: tuple[nn.Module, torch.Tensor],
) -> None:
    model, x = shared
    report = bn_diff.check(quiet(lambda: torch.export.export(model, (x,))), x, against=model)
    assert report and [lr.name for lr in report.layers] == NAMES


def test_export_without_names_is_paired_in_order(
    shared: tuple[nn.Module, torch.Tensor], tmp_path: Path
) -> None:
    model, x = shared
    proto = onnx.load(str(export(model, x, tmp_path / "m.onnx", "legacy_bn")))
    for i, n in enumerate(proto.graph.node):
        n.name = f"n{i}"  # what a graph rewriter that renames nodes leaves behind
    report = bn_diff.check(proto, x, against=model)
    assert report and [lr.name for lr in report.layers] == NAMES
    assert {lr.extra["matched_by"] for lr in report.layers} == {"order"}
    assert "matched_by_order" in {f.id for f in report.findings}
