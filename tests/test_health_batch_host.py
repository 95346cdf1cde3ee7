"""`health_batch.batch_dependence` works on the host in NumPy: the same numbers, to the bit, as
its torch formulas (kept here as the reference), NaN/Inf and every dtype included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bn_diff.capture import BnCall, Capture
from bn_diff.health_batch import batch_dependence
from bn_diff.health_screen import batch_moments
from bn_diff.pipeline import check_call, make_tolerance
from bn_diff.recompute import F64, as_f64, channel_moments

TOL = make_tolerance(None, None)


def torch_dependence(call: BnCall, bm: torch.Tensor, bv: torch.Tensor) -> tuple[float, int] | None:
    """The torch formulas batch_dependence had (sample 0 alone vs in the batch), with sample 0's
    moments where batch_dependence takes them: the check's pass's, else channel_moments'."""
    x = call.x.detach()
    c = int(x.shape[1])
    s0 = call.sample0 if call.sample0 is not None else channel_moments(x[:1])
    gamma = as_f64(call.weight, c, 1.0, x.device)
    a_batch = gamma / torch.sqrt(bv + call.eps)
    a_other = gamma / torch.sqrt(s0.var + call.eps)
    gaps = torch.maximum(
        (a_other * (s0.min - s0.mean) - a_batch * (s0.min - bm)).abs(),
        (a_other * (s0.max - s0.mean) - a_batch * (s0.max - bm)).abs(),
    )
    finite = torch.isfinite(gaps)
    if not bool(finite.any()):
        return None
    gaps = gaps.where(finite, torch.full_like(gaps, -1.0))
    ch = int(gaps.argmax())
    return float(gaps[ch]), ch


def one_call(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> BnCall:
    bn = (
        nn.BatchNorm2d(x.shape[1], eps=eps, affine=weight is not None).to(x.device, x.dtype).train()
    )
    if weight is not None:
        with torch.no_grad():
            bn.weight.copy_(weight.to(x.dtype))
    calls: list[BnCall] = []
    with torch.no_grad(), Capture(nn.Sequential(bn), calls.append, "as-is"):
        bn(x)
    return calls[0]


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    n=st.integers(2, 4),
    c=st.integers(1, 5),
    side=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    special=st.sampled_from(["none", "nan", "inf", "constant", "offset", "no_affine", "tiny_eps"]),
)
def test_batch_dependence_is_the_torch_formulas(
    dtype: torch.dtype, n: int, c: int, side: int, seed: int, special: str
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side, side + 1, generator=g).to(dtype)
    weight: torch.Tensor | None = torch.rand(c, generator=g) + 0.5
    eps = 1e-5
    if special == "nan":
        x[0, seed % c, 0, 0] = math.nan
    elif special == "inf":
        x[seed % n, seed % c, 0, 0] = math.inf
    elif special == "constant":
        x[:, seed % c] = 1.5
    elif special == "offset":
        x = x + 300
    elif special == "no_affine":
        weight = None
    elif special == "tiny_eps":
        eps = 1e-30  # torch refuses 0 in train mode
    call = one_call(x, weight, eps)
    result = check_call(call, TOL)
    bm, bv = batch_moments(result)
    got = batch_dependence(call, result)
    want = torch_dependence(call, bm, bv)
    if want is None:
        assert got is None
        return
    assert got is not None
    gap, ch = want
    assert got.channel == ch
    assert got.gap == gap or (math.isnan(got.gap) and math.isnan(gap))


@pytest.mark.parametrize("k", [2, 3])
def test_bn1d_compares_with_the_first_half_of_the_batch(k: int) -> None:
    x = torch.randn(2 * k, 3)
    bn = nn.BatchNorm1d(3).train()
    calls: list[BnCall] = []
    with torch.no_grad(), Capture(nn.Sequential(bn), calls.append, "as-is"):
        bn(x)
    call = calls[0]
    result = check_call(call, TOL)
    dep = batch_dependence(call, result)
    assert dep is not None and dep.samples == k
    bm, bv = batch_moments(result)
    other = channel_moments(x[:k])
    a_b = 1.0 / torch.sqrt(bv + call.eps)
    a_o = 1.0 / torch.sqrt(other.var + call.eps)
    s0 = channel_moments(x[:1])
    gaps = torch.maximum(
        (a_o * (s0.min - other.mean) - a_b * (s0.min - bm)).abs(),
        (a_o * (s0.max - other.mean) - a_b * (s0.max - bm)).abs(),
    )
    assert dep.gap == float(gaps.max()) and dep.channel == int(gaps.argmax())
    assert bm.dtype == F64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_dependence_on_a_gpu_is_the_torch_formulas(dtype: torch.dtype) -> None:
    """On a GPU the vectors come to the host in one transfer; the torch formulas there take
    CUDA's square root, the host torch's CPU one: the same up to the last bit."""
    x = (torch.randn(4, 5, 6, 7, generator=torch.Generator().manual_seed(2)) + 1).to(dtype)
    call = one_call(x.cuda(), torch.rand(5) + 0.5, 1e-5)
    result = check_call(call, TOL)
    bm, bv = batch_moments(result, "cuda")
    got = batch_dependence(call, result)
    want = torch_dependence(call, bm, bv)
    assert got is not None and want is not None
    assert got.channel == want[1]
    assert got.gap == pytest.approx(want[0], rel=1e-14)
