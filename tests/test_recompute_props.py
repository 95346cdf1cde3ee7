"""Healthy layers agree with the float64 recompute: property tests over BN kinds, shapes, dtypes."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bn_diff
from bn_diff.recompute import (
    batch_norm_by_hand,
    channel_moments,
    running_update,
    values_per_channel,
)

BN_BY_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@st.composite
def layers(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(2, 5))
    c = draw(st.integers(1, 6))
    spatial = [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    affine = draw(st.booleans())
    track = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, 0.01, 0.9, None]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    train = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    loc = draw(st.sampled_from([0.0, 3.0, -50.0, 1000.0]))
    scale = draw(st.sampled_from([1.0, 0.1, 10.0]))
    g = torch.Generator().manual_seed(seed)
    bn = BN_BY_DIM[ndim](c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
        if track:
            bn.running_mean.copy_(loc + torch.randn(c, generator=g) * scale)
            bn.running_var.copy_(torch.rand(c, generator=g) * scale**2 + 0.01)
            bn.num_batches_tracked.fill_(draw(st.integers(0, 5)))
    bn.train(train)
    x = loc + scale * torch.randn((n, c, *spatial), generator=g)
    return bn.to(dtype), x.to(dtype)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(layers())
def test_healthy_layer_agrees(case: tuple[nn.Module, torch.Tensor]) -> None:
    bn, x = case
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    report = bn_diff.run(bn, x)
    assert len(report.layers) == 1
    lr = report.layers[0]
    assert lr.mismatched == 0, lr
    assert lr.running_update is None or lr.running_update.ok, lr.running_update
    assert bool(report)
    expect_batch = bn.training or not bn.track_running_stats
    assert lr.info.stats == ("batch" if expect_batch else "running")
    # the model is left exactly as found
    after = bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(layers())
def test_by_hand_equals_pytorch_float64(case: tuple[nn.Module, torch.Tensor]) -> None:
    """In float64, by-hand and PyTorch agree to ~1 ulp-level relative error."""
    bn, x = case
    bn = bn.double()
    x = x.double()
    rm0 = None if bn.running_mean is None else bn.running_mean.clone()
    rv0 = None if bn.running_var is None else bn.running_var.clone()
    nbt0 = None if bn.num_batches_tracked is None else int(bn.num_batches_tracked)
    with torch.no_grad():
        y = bn(x)
    mom = channel_moments(x)
    use_batch = bn.training or rm0 is None
    mean, var = (mom.mean, mom.var) if use_batch else (rm0, rv0)
    c = x.shape[1]
    gamma = bn.weight.detach() if bn.affine else torch.ones(c, dtype=torch.float64)
    beta = bn.bias.detach() if bn.affine else torch.zeros(c, dtype=torch.float64)
    ours = batch_norm_by_hand(x, mean, var, gamma, beta, bn.eps)
    torch.testing.assert_close(ours, y, rtol=1e-10, atol=1e-10)
    if bn.training and rm0 is not None:
        exp = running_update(rm0, rv0, nbt0, mom, bn.momentum)
        torch.testing.assert_close(exp.mean, bn.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(exp.var, bn.running_var, rtol=1e-10, atol=1e-12)
        assert exp.num_batches_tracked == int(bn.num_batches_tracked)
        assert values_per_channel(x.shape) == mom.count


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.lists(st.integers(1, 40), min_size=0, max_size=3),
    st.floats(-1e4, 1e4),
    st.floats(1e-3, 1e2),
)
def test_chunked_moments_match_direct(
    n: int, c: int, spatial: list[int], loc: float, scale: float
) -> None:
    """Chan's chunk merge gives the same statistics as a direct float64 computation."""
    from bn_diff import recompute

    x = loc + scale * torch.randn((n, c, *spatial), dtype=torch.float64)
    old = recompute.CHUNK_ELEMS
    try:
        recompute.CHUNK_ELEMS = 7  # force many tiny chunks
        mom = recompute.channel_moments(x)
    finally:
        recompute.CHUNK_ELEMS = old
    dims = (0, *range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    torch.testing.assert_close(mom.mean, mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(mom.var, var, rtol=1e-9, atol=1e-9 * scale**2)
    torch.testing.assert_close(mom.min, x.amin(dim=dims))
    torch.testing.assert_close(mom.max, x.amax(dim=dims))


@settings(max_examples=200, deadline=None)
@given(
    shape=st.sampled_from([(3, 4), (2, 3, 5), (1, 2, 3, 3), (4, 1, 7), (1, 1)]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    values=st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -2.5, 1e-3, 3e4, 1000.5, float("nan"), float("inf")])
        | st.floats(-1e4, 1e4),
        min_size=1,
        max_size=1,
    ),
    seed=st.integers(0, 2**31 - 1),
    special=st.integers(0, 7),
)
def test_one_chunk_moments_are_the_merged_ones_to_the_bit(
    shape: tuple[int, ...], dtype: torch.dtype, values: list[float], seed: int, special: int
) -> None:
    """A tensor of one chunk skips the merge (a third of the torch calls in a hook): the same
    bits, the sign of a zero mean and NaN/Inf included."""
    from bn_diff import recompute

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (seed % 7 - 3)).to(dtype)
    flat = x.view(-1)
    if special == 1:
        flat[seed % flat.numel()] = values[0]
    elif special == 2:
        flat[:] = -0.0
    elif special == 3:
        x[:, 0] = -0.0
    elif special == 4:
        flat[0], flat[-1] = -float("inf"), float("inf")
    elif special == 5:
        x += 1000
    elif special == 6 and dtype == torch.float64:  # the mean squared overflows
        x = x * 1e-3 + 2e154
    one, merged = recompute._one_chunk(x), recompute._merged(x)
    assert one.count == merged.count
    for field in ("mean", "var", "min", "max"):
        a, b = getattr(one, field), getattr(merged, field)
        same = (a == b) & (torch.signbit(a) == torch.signbit(b)) | (a.isnan() & b.isnan())
        assert bool(same.all()), (field, a, b)
