"""Health findings on a CUDA device: the same findings, with the same numbers, as on the CPU.

Skipped without CUDA. Each case builds one faulty model (as in test_health.py), runs it on both
devices and compares ids, severities and the numbers in `data`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import test_health as th
import torch
from torch import nn

from bn_diff.pipeline import run
from bn_diff.render.html import render_html

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train(net: nn.Module) -> nn.Module:
    th.bn(net).train()
    return net


def _frozen(net: nn.Module) -> nn.Module:
    th.bn(net).train()
    th.bn(net).requires_grad_(False)
    return net


def _dead(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        th.bn(net).weight[0] = 0.0
    return net


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "healthy": (th.calibrated, lambda x: x),
    "train_mode_layer": (lambda: _train(th.calibrated()), lambda x: x),
    "frozen_bn_updates_stats": (lambda: _frozen(th.calibrated()), lambda x: x),
    "untrained_running_stats": (lambda: th.conv_bn().eval(), lambda x: x),
    "nonfinite_stats": (lambda: th.with_buffer(2, rv=float("nan")), lambda x: x),
    "nonpositive_running_var": (lambda: th.with_buffer(1, rv=-0.5), lambda x: x),
    "tiny_running_var": (lambda: th.with_buffer(3, rv=1e-8), lambda x: x),
    "dead_channel": (lambda: _dead(th.calibrated()), lambda x: x),
    "redundant_conv_bias": (
        lambda: th.models.calibrate(th.conv_bn(bias=True), (16, 3, 8, 8), batches=20),
        lambda x: x,
    ),
    "no_running_stats": (lambda: th.conv_bn(track_running_stats=False).eval(), lambda x: x),
    "stats_shift": (th.calibrated, lambda x: x * 255.0),
    "fp16_overflow_risk": (lambda: th.with_buffer(0, rv=1e5), lambda x: x),
    "momentum_none": (lambda: th.calibrated(momentum=None), lambda x: x),
}


def _close(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-5)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_findings_on_cuda(case: str) -> None:
    torch.backends.cudnn.allow_tf32 = False  # the conv before BN must match the CPU's closely
    build, transform = CASES[case]
    net = build()
    x = transform(th.data())
    cpu = run(copy.deepcopy(net), x)
    gpu = run(copy.deepcopy(net).cuda(), x.cuda())
    assert gpu.device.startswith("cuda")
    # CUDA runs add one run-wide note about TF32 (see test_tf32.py); the health findings are equal
    assert "tf32_convolutions" in {f.id for f in gpu.findings}
    gpu_findings = [f for f in gpu.all_findings if f.id != "tf32_convolutions"]
    assert [(f.id, f.severity) for f in gpu_findings] == [
        (f.id, f.severity) for f in cpu.all_findings
    ]
    if case != "healthy":
        assert case in {f.id for f in gpu_findings}
    for fc, fg in zip(cpu.all_findings, gpu_findings, strict=True):
        assert set(fc.data) == set(fg.data)
        for k in fc.data:
            assert _close(fc.data[k], fg.data[k]), (case, k, fc.data[k], fg.data[k])
    assert render_html(gpu).count("<svg") == 3 * len(gpu.layers)
