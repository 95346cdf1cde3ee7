"""Injected faults are caught, on the right layer: the checker can fail."""

from __future__ import annotations

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_diff


class AlteredEps(nn.BatchNorm2d):
    """Claims eps=1e-5 but computes with 1e-3 (a Keras/MXNet default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            0.0 if self.momentum is None else self.momentum,
            1e-3,
        )


class AlteredStats(nn.BatchNorm2d):
    """Running variance off by 1e-3 relative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var * 1.001,
            self.weight,
            self.bias,
            False,
            0.1,
            self.eps,
        )


class FusedReLU(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class UnbiasedTrain(nn.BatchNorm1d):
    """Normalizes with the unbiased batch variance (numpy's ddof=1 by habit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=0, correction=1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class SkippedUpdate(nn.BatchNorm2d):
    """Train-mode forward that forgets to update the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps)


def _cnn_with(bad: nn.Module, small_var: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bad, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        bad.running_mean.uniform_(-0.2, 0.2)
        bad.running_var.uniform_(0.02, 0.05) if small_var else bad.running_var.uniform_(0.5, 2)
        net[3].running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.mark.parametrize(
    "bad", [AlteredEps(4), AlteredStats(4), FusedReLU(4)], ids=lambda m: type(m).__name__
)
def test_fault_is_caught_on_its_layer(bad: nn.Module) -> None:
    net = _cnn_with(bad)
    report = bn_diff.run(net, torch.randn(4, 3, 8, 8))
    assert not report
    names = {lr.name: lr for lr in report.layers}
    assert not names["1"], "the faulty layer must mismatch"
    assert names["1"].mismatched > 0
    assert names["1"].info.producer == "0"
    assert names["3"], "the healthy layer after it must still agree"


def test_stats_off_by_1e3_relative_is_flagged_even_with_large_variance() -> None:
    net = _cnn_with(AlteredStats(4), small_var=False)
    report = bn_diff.run(net, 3 * torch.randn(8, 3, 16, 16))
    assert not report.layers[0]


def test_unbiased_variance_caught_with_small_batch() -> None:
    bn = UnbiasedTrain(6)
    report = bn_diff.run(bn, torch.randn(4, 6))
    assert not report
    assert report.layers[0].info.stats == "batch"


def test_missing_running_update_is_caught() -> None:
    bn = SkippedUpdate(3).train()
    report = bn_diff.run(bn, torch.randn(4, 3, 5, 5))
    # the output itself is a correct train-mode BN ...
    assert report.layers[0].mismatched == 0
    # ... but PyTorch semantics require the buffers to move, and they did not
    ru = report.layers[0].running_update
    assert ru is not None and not ru.ok and not ru.num_batches_tracked_ok
    assert not report


def test_explicit_tolerance_overrides_and_pairs() -> None:
    net = _cnn_with(AlteredStats(4))
    x = torch.randn(4, 3, 8, 8)
    assert bn_diff.run(net, x, atol=1.0, rtol=0.0)
    with pytest.raises(bn_diff.UsageError):
        bn_diff.run(net, x, atol=1e-3)


def test_healthy_real_architectures_agree() -> None:
    for factory, shape in (
        (models.resnet_tiny, (4, 3, 32, 32)),
        (models.mobilenet_tiny, (4, 3, 32, 32)),
        (models.mlp_bn1d, (16, 20)),
    ):
        net = models.calibrate(factory(), shape)
        for mode in ("eval", "train"):
            report = bn_diff.run(net, torch.randn(shape) * 1.5 + 0.2, mode=mode)
            assert report, [(lr.name, lr.max_abs_diff) for lr in report.layers if not lr]
            assert {lr.info.mode for lr in report.layers} == {mode}


def test_cancellation_prone_float32_is_not_a_false_alarm() -> None:
    """Channel mean 1000, std 0.1-1: float32 BN is off by ~1e-4 absolute yet correct."""
    for std in (0.1, 0.3, 1.0):
        bn = nn.BatchNorm2d(8).train()
        x = 1000 + std * torch.randn(16, 8, 16, 16)
        report = bn_diff.run(bn, x)
        assert report, report.layers[0].max_abs_diff
        bn.eval()
        with torch.no_grad():
            bn.running_mean.fill_(1000.0)
            bn.running_var.fill_(std**2)
        assert bn_diff.run(bn, x)
