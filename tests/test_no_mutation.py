"""bn-diff leaves the model exactly as it found it: buffers, parameters, flags, hooks."""

from __future__ import annotations

import models
import pytest
import torch
from torch import nn

import bn_diff


def _snapshot(
    model: nn.Module,
) -> tuple[dict[str, torch.Tensor], list[bool], list[tuple[int, ...]]]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    hooks = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    return sd, flags, hooks


def _assert_same(
    model: nn.Module, snap: tuple[dict[str, torch.Tensor], list[bool], list[tuple[int, ...]]]
) -> None:
    sd, flags, hooks = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    for k in sd:
        assert now[k].dtype == sd[k].dtype and torch.equal(now[k], sd[k]), k
    assert [m.training for m in model.modules()] == flags
    assert [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ] == hooks


@pytest.mark.parametrize("mode", ["as-is", "train", "eval"])
def test_state_flags_and_hooks_restored(mode: str) -> None:
    net = models.calibrate(models.resnet_tiny(), (4, 3, 16, 16))
    net.layer1.train()  # a mix of modes, as a real half-frozen model has
    snap = _snapshot(net)
    report = bn_diff.run(net, torch.randn(4, 3, 16, 16), mode=mode)
    assert report
    _assert_same(net, snap)


def test_restored_when_forward_raises_halfway() -> None:
    class Halfway(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm1d(3)
            self.bn2 = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn1(x)
            raise RuntimeError("user code fails after the first BN")

    net = Halfway().train()
    snap = _snapshot(net)
    with pytest.raises(bn_diff.ModelError):
        bn_diff.run(net, torch.randn(5, 3))
    _assert_same(net, snap)
    assert int(net.bn1.num_batches_tracked) == 0


def test_user_hooks_kept_and_called() -> None:
    net = models.forum_net()
    calls: list[str] = []
    h = net.bn.register_forward_hook(lambda m, i, o: calls.append("user"))
    snap = _snapshot(net)
    bn_diff.run(net, torch.randn(2, 3, 4, 4))
    assert calls == ["user"]
    _assert_same(net, snap)
    h.remove()


def test_train_mode_forward_does_not_leave_updated_stats() -> None:
    net = models.forum_net()  # train mode, untrained statistics
    rm = net.bn.running_mean.clone()
    report = bn_diff.run(net, torch.randn(4, 3, 8, 8))
    ru = report.layers[0].running_update
    assert ru is not None and ru.ok and ru.largest_mean_change > 0  # PyTorch did move them ...
    assert torch.equal(net.bn.running_mean, rm)  # ... and bn-diff put them back
    assert int(net.bn.num_batches_tracked) == 0


class _Odd(nn.Module):
    """Buffers of several dtypes, one a non-contiguous view, one sparse, two written in place by
    the forward even in eval mode, one NaN. (A sparse buffer made the restore raise before.)"""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("f16", torch.tensor([1.5, -2.0], dtype=torch.float16))
        self.register_buffer("strided", torch.arange(12.0).view(3, 4).t())
        self.register_buffer("sparse", torch.eye(3).to_sparse())
        self.register_buffer("nan", torch.tensor([float("nan"), 1.0]))
        self.register_buffer("count", torch.tensor(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self.strided.mul_(2.0)
        return self.bn(x)


@pytest.mark.parametrize("mode", ["as-is", "train", "eval"])
def test_every_kind_of_buffer_comes_back_and_unchanged_ones_are_not_written(mode: str) -> None:
    net = _Odd().eval()
    before = {k: (v, v.detach().clone(), v._version) for k, v in net.named_buffers()}
    bn_diff.run(net, torch.randn(5, 3), mode=mode)
    for k, (obj, value, version) in before.items():
        now = dict(net.named_buffers())[k]
        assert now is obj, k  # the same tensor object, as the model's other references see it
        assert now.dtype == value.dtype and now.shape == value.shape, k
        if now.is_sparse:
            assert torch.equal(now.to_dense(), value.to_dense())
        else:
            assert torch.equal(now.nan_to_num(), value.nan_to_num()), k
            assert now.stride() == value.stride(), k
        # what the forward wrote, NaN (never equal to itself) and sparse (no equality kernel) are
        # written back; read-only buffers keep their version counter: nothing wrote them
        written = k in ("count", "strided", "nan", "sparse")
        if not written and not (mode == "train" and k.startswith("bn.")):
            assert now._version == version, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["as-is", "train", "eval"])
def test_buffers_on_a_gpu_come_back(mode: str) -> None:
    net = models.calibrate(models.resnet_tiny(), (4, 3, 16, 16)).cuda()
    net.layer1.train()
    snap = _snapshot(net)
    versions = {k: v._version for k, v in net.named_buffers()}
    bn_diff.run(net, torch.randn(4, 3, 16, 16, device="cuda"), mode=mode)
    _assert_same(net, snap)
    if mode == "eval":  # nothing wrote them: no write back either
        assert {k: v._version for k, v in net.named_buffers()} == versions
