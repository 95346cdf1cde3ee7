"""What capture sees: every kind of BN call, named and attributed correctly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bn_diff


class FrozenBatchNorm2d(nn.Module):
    """torchvision/detectron2 style: buffers only, always running statistics."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class FunctionalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.gamma = nn.Parameter(torch.rand(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            self.conv(x), self.rm, self.rv, self.gamma, None, self.training, 0.2, 1e-4
        )


def test_functional_batch_norm_reported_under_caller() -> None:
    net = nn.Sequential()
    net.add_module("block", FunctionalBlock())
    for train in (True, False):
        net.train(train)
        report = bn_diff.run(net, torch.randn(3, 3, 5, 5))
        assert [lr.name for lr in report.layers] == ["block:F.batch_norm"]
        lr = report.layers[0]
        assert lr.info.type == "F.batch_norm" and lr.info.eps == 1e-4 and lr.info.momentum == 0.2
        assert lr.info.stats == ("batch" if train else "running")
        assert lr.info.producer == "block.conv"
        assert bool(lr) and (lr.running_update is not None) == train
    assert torch.equal(net.block.rm, torch.zeros(4)), "functional running buffers restored too"


def test_module_bn_is_not_double_counted() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).train()
    report = bn_diff.run(net, torch.randn(2, 3, 4, 4))
    assert [lr.name for lr in report.layers] == ["1", "2"]
    assert report.layers[0].info.producer == "0" and report.layers[1].info.producer is None


def test_frozen_batchnorm_duck_type_uses_running_stats() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)).train()
    report = bn_diff.run(net, torch.randn(2, 3, 6, 6))
    lr = report.layers[0]
    assert lr.info.type == "FrozenBatchNorm2d" and lr.info.stats == "running"
    assert lr, lr.max_abs_diff


def test_frozen_batchnorm_that_ignores_its_eps_is_caught() -> None:
    bn = FrozenBatchNorm2d(4, eps=1e-2)
    bn.running_var.fill_(1e-4)
    assert bn_diff.run(nn.Sequential(bn), torch.randn(2, 4, 3, 3) * 0.01)

    class Hardcoded(FrozenBatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # ignores self.eps: older torchvision
            scale = self.weight * self.running_var.rsqrt()
            return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(
                1, -1, 1, 1
            )

    hb = Hardcoded(4, eps=1e-2)
    hb.running_var.fill_(1e-4)
    assert not bn_diff.run(nn.Sequential(hb), torch.randn(2, 4, 3, 3) * 0.01)


def test_shared_layer_called_twice_is_reported_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.bn(x) * 2)

    report = bn_diff.run(Twice().train(), torch.randn(6, 3))
    assert [lr.name for lr in report.layers] == ["bn", "bn#2"]
    assert all(report.layers)
    # the second call sees the running statistics the first call wrote
    assert report.layers[1].info.num_batches_tracked == 1


def test_bn_kinds_and_options() -> None:
    cases = [
        (nn.BatchNorm1d(5, affine=False), (4, 5)),
        (nn.BatchNorm1d(5, momentum=None), (4, 5, 7)),
        (nn.BatchNorm3d(2, track_running_stats=False).eval(), (2, 2, 3, 3, 3)),
        (nn.SyncBatchNorm(3).eval(), (2, 3, 4, 4)),
    ]
    for bn, shape in cases:
        report = bn_diff.run(bn, torch.randn(shape))
        assert report, (bn, report.layers[0].max_abs_diff)
    lazy = nn.LazyBatchNorm2d()
    lazy(torch.randn(2, 3, 4, 4))  # materialise
    report = bn_diff.run(lazy.eval(), torch.randn(2, 3, 4, 4))
    assert report and report.layers[0].info.num_features == 3
    tr = bn_diff.run(
        nn.BatchNorm3d(2, track_running_stats=False).eval(), torch.randn(2, 2, 3, 3, 3)
    )
    assert tr.layers[0].info.stats == "batch" and tr.layers[0].info.mode == "eval"
