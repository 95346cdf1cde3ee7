"""Sample 0's moments from the check's own pass (`fused.SampleSums` → `Host.sample0` →
`FusedResult.sample0` → `BnCall.sample0`), which the health check of batch dependence reads instead
of walking x[:1] again: as good as `channel_moments(x[:1])` (min and max to the bit, mean and
variance to float64 rounding), in every layout that has them, with either kernel policy; None where
they could lose digits, and then health_batch falls back to `channel_moments`."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fused import make_case
from test_health_batch_host import one_call as health_batch_call
from test_kernels import poorly_pivoted_case

from bn_diff import fused, kernels
from bn_diff.capture import BnCall
from bn_diff.fused import fused_check
from bn_diff.health_batch import batch_dependence
from bn_diff.pipeline import check_call, make_tolerance
from bn_diff.recompute import F64, Moments, channel_moments

TOL = make_tolerance(None, None)


@pytest.fixture(params=["eager", "compiled"])
def policy(request: pytest.FixtureRequest) -> Iterator[str]:
    kernels.set_policy(request.param)
    kernels.reset()
    try:
        yield request.param
    finally:
        kernels.set_policy(None)
        kernels.reset()


def sample0_of(case: dict[str, object], target: int | None = None) -> Moments | None:
    fast = fused_check(
        *(case[k] for k in ("x", "y", "gamma", "beta", "rm", "rv", "train")),  # type: ignore[arg-type]
        1e-5,
        TOL,
        target=target,
    )
    assert fast is not None
    return fast.sample0


def assert_close_to_two_pass(got: Moments, x: torch.Tensor) -> None:
    """min/max exactly; mean and variance within float64 rounding of sums over a sample."""
    ref = channel_moments(x[:1])
    assert got.count == ref.count
    assert got.mean.dtype == got.var.dtype == got.min.dtype == got.max.dtype == F64
    assert torch.equal(got.min, ref.min) and torch.equal(got.max, ref.max)
    spread = ref.var.sqrt() + ref.mean.abs() + 1e-300
    assert bool(((got.mean - ref.mean).abs() <= 1e-12 * spread).all())
    assert bool(((got.var - ref.var).abs() <= 1e-10 * ref.var + 1e-15 * spread**2).all())


# (N, C, H, W): planes of 16 and 121 values (eager "fold"), 144 (eager "rows", kernel "fold"),
# 2304 (both "rows")
SHAPES = [(2, 3, 4, 4), (4, 5, 11, 11), (3, 4, 12, 12), (2, 3, 48, 48)]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
    mean=st.sampled_from([0.0, 3.0, -250.0]),
    std=st.sampled_from([1.0, 1e-2, 40.0]),
)
def test_sample0_is_the_two_pass_moments_of_x0(
    policy: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    mean: float,
    std: float,
) -> None:
    case = make_case(shape, dtype, True, seed, mean, std)
    got = sample0_of(case)
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    # a sample's mean may lie far from the pivot (the batch's) in std units of that sample only
    # when samples differ a lot, which randn batches do not: every layout here has them
    assert got is not None, (policy, shape)
    assert_close_to_two_pass(got, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_running_statistics_layers_have_none(policy: str, shape: tuple[int, ...]) -> None:
    """Batch dependence is measured only where the batch's statistics normalized the output: with
    running statistics no pass spends anything on sample 0."""
    assert sample0_of(make_case(shape, torch.float32, False, 3)) is None


def test_split_layout_and_one_value_planes_have_none() -> None:
    """Blocks smaller than a channel ("split") and BatchNorm1d on (N, C) keep no sample-0 sums."""
    case = make_case((4, 3, 10, 10), torch.float32, True, 1)
    assert sample0_of(case, target=64) is None  # 4 x 100 values per channel in blocks of 64
    assert sample0_of(make_case((6, 4), torch.float32, True, 2)) is None


@pytest.mark.parametrize("side", [16, 64])
def test_a_redone_layer_keeps_them_right(policy: str, side: int) -> None:
    """Every channel summed a second time around a better pivot: the spliced or re-run pass's
    sample-0 sums go with its pivots."""
    case = poorly_pivoted_case(True, side)
    got = sample0_of(case)
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    assert got is not None
    assert_close_to_two_pass(got, x)


def one_call(x: torch.Tensor) -> BnCall:
    """One train-mode BatchNorm2d call on x (gamma 1, beta 0)."""
    return health_batch_call(x, None, 1e-5)


def test_a_sample_far_from_the_pivot_falls_back_to_two_passes(policy: str) -> None:
    """Sample 0 a thousand of its own standard deviations from the batch's mean: sums around the
    batch's pivot would lose digits of its variance, so the pass hands none over and
    batch_dependence walks x[:1] itself."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 8, 8, generator=g)
    x[0] = x[0] * 1e-3 + 50.0
    call = one_call(x)
    result = check_call(call, TOL)
    assert call.sample0 is None
    dep = batch_dependence(call, result)
    assert dep is not None and math.isfinite(dep.gap)


def test_batch_dependence_with_the_pass_moments_is_the_two_pass_one(policy: str) -> None:
    """The health finding's number, from the pass's sample-0 moments, is the one channel_moments'
    would give, to float64 rounding."""
    x = torch.randn(8, 6, 20, 20, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    call = one_call(x)
    result = check_call(call, TOL)
    assert call.sample0 is not None
    got = batch_dependence(call, result)
    call.sample0 = None  # the fallback: channel_moments(x[:1])
    want = batch_dependence(call, result)
    assert got is not None and want is not None
    assert got.channel == want.channel
    assert got.gap == pytest.approx(want.gap, rel=1e-12)


def test_nonfinite_sample0_falls_back(policy: str) -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x[0, 1, 2, 3] = math.inf
    y = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    fast = fused_check(x, y, ones, zeros, None, None, True, 1e-5, TOL)
    assert fast is not None and fast.sample0 is None


def test_sample_sums_are_plain_partial_results() -> None:
    """The eager "fold" pass's sums are per block: several channel groups concatenate in order."""
    case = make_case((2, 40, 6, 6), torch.float32, True, 9)
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    xv = fused.view3(x)
    yv = fused.view3(case["y"])  # type: ignore[arg-type]
    assert xv is not None and yv is not None
    bn = fused.BnArgs(case["gamma"], case["beta"], None, None, True, 1e-5)  # type: ignore[arg-type]
    part = fused.fused_pass(xv, yv, bn, target=2 * 36 * 7, use_kernel=False)  # 7 channels a block
    assert part.layout == "fold" and part.sample0 is not None
    s = part.sample0
    xp0 = x[0].reshape(40, 36).to(F64) - part.pivot.view(-1, 1)
    assert torch.allclose(s.s1, xp0.sum(1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(s.s2, (xp0 * xp0).sum(1), rtol=1e-12, atol=0)
    assert torch.equal(s.xmin, x[0].reshape(40, 36).amin(1).to(F64))
    assert s.count == 36


@pytest.mark.parametrize("train", [True, False])
def test_both_host_branches_unpack_the_same_sample0(train: bool) -> None:
    """Host.of reads CPU float64 tensors in place, and makes one transfer otherwise (a GPU; here
    float32 gamma/beta take that branch on CPU): the sample-0 vectors come out of either
    unpacking in their place, beside the running statistics and the batch's root."""
    from bn_diff.fused_verdict import Host

    case = make_case((4, 6, 7, 7), torch.float32, train, 11, 3.0)
    x, y, g, b, rm, rv = (case[k] for k in ("x", "y", "gamma", "beta", "rm", "rv"))
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    assert isinstance(g, torch.Tensor) and isinstance(b, torch.Tensor)
    assert isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)
    xv, yv = fused.view3(x), fused.view3(y)
    assert xv is not None and yv is not None
    bn = fused.BnArgs(g, b, None if train else rm, None if train else rv, train, 1e-5)
    with kernels.using("eager"):
        part = fused.fused_pass(xv, yv, bn, 1 << 18)
    m = int(xv.shape[0] * xv.shape[2])
    running = None if train else (rm, torch.sqrt(rv + 1e-5))
    eps = 1e-5 if train else None
    views = Host.of(part, g, b, running, m, eps)
    moved = Host.of(part, g.float(), b.float(), running, m, eps)
    if not train:  # running statistics: no sample-0 sums were kept
        assert part.sample0 is None and views.sample0 is None and moved.sample0 is None
        assert views.rm is not None and moved.rm is not None and moved.sd is not None
        assert views.rm.tobytes() == moved.rm.tobytes() == rm.numpy().tobytes()
        return
    assert views.sample0 is not None and moved.sample0 is not None
    for u, v in zip(views.sample0, moved.sample0, strict=True):
        assert u.tobytes() == v.tobytes()
    ref = channel_moments(x[:1])
    assert views.sample0[2].tobytes() == ref.min.numpy().tobytes()


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (1, 3, 48, 48)])
def test_a_batch_of_one_keeps_none(policy: str, shape: tuple[int, ...]) -> None:
    """Batch dependence needs two samples: a batch of one spends nothing on sample 0."""
    assert sample0_of(make_case(shape, torch.float32, True, 6)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES)
def test_sample0_on_cuda(policy: str, shape: tuple[int, ...]) -> None:
    """On a GPU the sums come to the host in Host.of's one transfer and the moments go back to
    the device (pinned, without waiting): the same numbers as channel_moments there, and
    batch_dependence takes its roots on the device from them."""
    case = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v)
        for k, v in make_case(shape, torch.float32, True, 8, 2.0).items()
    }
    got = sample0_of(case)
    x = case["x"]
    assert got is not None and isinstance(x, torch.Tensor)
    assert got.mean.device.type == "cuda"
    assert_close_to_two_pass(got, x)
    call = one_call(x)
    result = check_call(call, TOL)
    assert call.sample0 is not None
    dep = batch_dependence(call, result)
    call.sample0 = None
    want = batch_dependence(call, result)
    assert dep is not None and want is not None
    assert dep.gap == pytest.approx(want.gap, rel=1e-12)
