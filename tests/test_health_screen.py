"""The health screen skips work, never findings: with it and without it, the same findings.

`layer_findings(..., screen=True)` (what the pipeline runs) asks `health_screen.suspicious` first
and skips the checks of the layer's vectors when it says no; `screen=False` runs every check.
Hypothesis draws BN layers with ordinary, special and borderline numbers and compares both, down
to each finding's message and data; directed tests put a channel right at the stats_shift
thresholds, and check that healthy layers really take the short way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bn_diff import health, health_checks
from bn_diff.capture import BnCall
from bn_diff.health import layer_findings
from bn_diff.health_batch import SHIFT_STD_RATIO, z_threshold
from bn_diff.health_screen import as_vec, as_vecs, batch_moments
from bn_diff.pipeline import run
from bn_diff.results import Finding, LayerResult

SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-5, 1e-8, 1e-6, 65504.0, 1e5, 1e-300, -0.5, 3.0]
NONFINITE = [math.nan, math.inf, -math.inf]


def both_ways(net: nn.Module, x: torch.Tensor, **kw: Any) -> list[tuple[list[Finding], ...]]:
    """For every BN call of one forward: (findings with the screen, findings without it)."""
    pairs: list[tuple[list[Finding], ...]] = []

    def ext(call: BnCall, res: LayerResult) -> LayerResult:
        for run_mode in ("as-is", "train"):
            fast = layer_findings(call, res, run_mode, screen=True)
            full = layer_findings(call, res, run_mode, screen=False)
            pairs.append((fast, full))
        return res

    run(net, x, health=False, extensions=[ext], **kw)
    assert pairs, "no BN call was seen"
    return pairs


def assert_same(net: nn.Module, x: torch.Tensor, **kw: Any) -> list[Finding]:
    found: list[Finding] = []
    for fast, full in both_ways(net, x, **kw):
        assert repr(fast) == repr(full)  # every field, and NaN in data equal to NaN
        found += full
    return found


def channel_values(allow_nonfinite: bool) -> st.SearchStrategy[float]:
    pool = SPECIAL + (NONFINITE if allow_nonfinite else [])
    return st.one_of(
        st.floats(-4.0, 4.0, allow_nan=False, width=32),
        st.sampled_from(pool),
    )


@st.composite
def bn_case(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, str]:
    c = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["2d", "1d"]))
    affine = draw(st.booleans())
    track = draw(st.integers(0, 5)) > 0
    momentum = draw(st.sampled_from([0.1, None, 0.0]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-300]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    bn_cls = nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d
    m = bn_cls(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    bad = draw(st.integers(0, 4)) == 0  # now and then a non-finite number
    vec = st.lists(channel_values(bad), min_size=c, max_size=c)
    with torch.no_grad():
        if track:
            rm = draw(st.one_of(vec, st.just([0.0] * c)))
            rv = draw(st.one_of(vec.map(lambda v: [abs(e) for e in v]), vec, st.just([1.0] * c)))
            m.running_mean.copy_(torch.tensor(rm, dtype=dtype))  # type: ignore[union-attr]
            m.running_var.copy_(torch.tensor(rv, dtype=dtype))  # type: ignore[union-attr]
            m.num_batches_tracked.fill_(draw(st.sampled_from([0, 0, 7])))  # type: ignore[union-attr]
        if affine:
            m.weight.copy_(torch.tensor(draw(vec), dtype=dtype))
            m.bias.copy_(torch.tensor(draw(vec), dtype=dtype))
            if draw(st.booleans()):
                m.requires_grad_(False)
    n = draw(st.sampled_from([1, 2, 4]))
    shape = (n, c, 3, 2) if kind == "2d" else (max(n, 2), c)
    if kind == "1d" and track and draw(st.booleans()):
        shape = (1, c)  # eval with running statistics only: batch statistics need two values
    scale = draw(st.sampled_from([1.0, 0.01, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.5, 10.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    if track and draw(st.booleans()):  # healthy statistics, then at most one odd number
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            m.running_mean.copy_(x.double().mean(dims))  # type: ignore[union-attr]
            m.running_var.copy_(x.double().var(dims, unbiased=False))  # type: ignore[union-attr]
            m.num_batches_tracked.fill_(3)  # type: ignore[union-attr]
            if affine:
                m.weight.copy_(torch.tensor(draw(vec), dtype=dtype).abs() + 0.5)
            names = ["running_mean", "running_var"] + (["weight", "bias"] if affine else [])
            odd = draw(st.sampled_from([None, *names]))
            if odd is not None:
                getattr(m, odd)[draw(st.integers(0, c - 1))] = draw(channel_values(bad))
    if bad and draw(st.booleans()):
        x.view(-1)[0] = draw(st.sampled_from(NONFINITE))
    mode = draw(st.sampled_from(["eval", "train", "as-is"]))
    if mode != "eval" and math.prod(shape) // c < 2:
        mode = "eval"
    m.train(draw(st.booleans()))
    return m, x, mode


@settings(max_examples=300, deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])
@given(bn_case())
def test_the_screen_changes_no_finding(case: tuple[nn.Module, torch.Tensor, str]) -> None:
    net, x, mode = case
    assert_same(net, x, mode=mode)


# --- right at the thresholds ----------------------------------------------------------------------
def _moments(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    got: list[tuple[torch.Tensor, torch.Tensor]] = []

    def ext(call: BnCall, res: LayerResult) -> LayerResult:
        got.append(batch_moments(res))
        return res

    run(net, x, health=False, extensions=[ext], mode="eval")
    return got[0]


@pytest.mark.parametrize("which", ["z", "std"])
@pytest.mark.parametrize("rel", [-1e-7, -1e-12, 0.0, 1e-12, 1e-7])
def test_stats_shift_at_its_threshold(which: str, rel: float) -> None:
    """A channel placed at the threshold ×(1 + rel): both ways agree, and they flag it when
    clearly above and not when clearly below."""
    net = nn.BatchNorm2d(3).double().eval()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bm, bv = _moments(net, x)
    eps = net.eps
    with torch.no_grad():
        assert net.running_mean is not None and net.running_var is not None
        net.running_mean.copy_(bm)
        net.running_var.copy_(bv)
        if which == "z":  # |μ_B − rm| = z_thr·sqrt(rv + ε)·(1 + rel) in channel 1
            z_thr = max(3.0, 6.0 / math.sqrt(4))
            sd = math.sqrt(float(bv[1]) + eps)
            net.running_mean[1] = float(bm[1]) - z_thr * sd * (1 + rel)
        else:  # sqrt(σ²_B + ε) = 3·sqrt(rv + ε)·(1 + rel) in channel 1
            net.running_var[1] = (float(bv[1]) + eps) / (SHIFT_STD_RATIO * (1 + rel)) ** 2 - eps
    found = assert_same(net, x, mode="eval")
    shifted = [f for f in found if f.id == "stats_shift"]
    if rel >= 1e-7:
        assert shifted
    if rel <= -1e-7:
        assert not shifted


def _calls_and_results(net: nn.Module, x: torch.Tensor) -> list[tuple[BnCall, LayerResult]]:
    got: list[tuple[BnCall, LayerResult]] = []

    def ext(call: BnCall, res: LayerResult) -> LayerResult:
        got.append((call, res))
        return res

    run(net, x, health=False, extensions=[ext])
    return got


def settled(net: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """`net` with running statistics equal to x's batch statistics: healthy on x."""
    bm, bv = _moments(net, x)
    with torch.no_grad():
        assert net.running_mean is not None and net.running_var is not None
        assert net.num_batches_tracked is not None
        net.running_mean.copy_(bm)
        net.running_var.copy_(bv)
        net.num_batches_tracked.fill_(10)
    assert assert_same(net, x, mode="eval") == []
    return x


@pytest.mark.parametrize("where", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("value", NONFINITE)
def test_one_nonfinite_number_anywhere(where: str, value: float) -> None:
    net = nn.BatchNorm2d(3).double().eval()
    x = settled(net, torch.randn(2, 3, 2, 2, dtype=torch.float64))
    with torch.no_grad():
        getattr(net, where)[2] = value
    found = assert_same(net, x, mode="eval")
    assert "nonfinite_stats" in {f.id for f in found}


def test_nonfinite_written_by_the_forward_alone() -> None:
    net = nn.BatchNorm2d(3).train()
    x = torch.randn(2, 3, 2, 2)
    x[:, 1] = math.inf  # only the running statistics written by this forward hold it
    found = assert_same(net, x, mode="train")
    assert "this forward wrote" in next(f.message for f in found if f.id == "nonfinite_stats")


@pytest.mark.parametrize("biggest", [0.5, 1.0, 40.0])
def test_dead_channel_exactly_at_its_threshold(biggest: float) -> None:
    """|γ| equal to the threshold is dead (≤), in float64 where the threshold is exact."""
    thr = health_checks.DEAD_GAMMA * max(1.0, biggest)
    net = nn.BatchNorm1d(3).double().eval()
    x = settled(net, torch.randn(4, 3, dtype=torch.float64))
    with torch.no_grad():
        net.weight.copy_(torch.tensor([biggest, thr, -2 * thr], dtype=torch.float64))
    found = assert_same(net, x, mode="eval")
    dead = [f for f in found if f.id == "dead_channel"]
    assert dead and all(f.data["channels"] == [1] for f in dead)


def test_stats_shift_with_a_running_var_near_zero_and_a_tinier_eps() -> None:
    """rv + ε far below float32's normal numbers: the screen leaves it to the check."""
    net = nn.BatchNorm2d(2, eps=1e-300).double().eval()
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bm, _ = _moments(net, x)
    with torch.no_grad():
        net.running_var.fill_(1e-40)  # type: ignore[union-attr]
        net.running_mean.copy_(bm + 1e-19)  # type: ignore[union-attr]  # z ≈ 5 in both
    found = assert_same(net, x, mode="eval")
    assert "stats_shift" in {f.id for f in found}


def test_tiny_running_var_of_a_constant_channel() -> None:
    """rv ≤ ε where the batch is constant too: no shift to give the layer away, only rv."""
    net = nn.BatchNorm2d(3).double().eval()
    x = settled(net, torch.randn(2, 3, 2, 2, dtype=torch.float64))
    x[:, 1] = 0.25
    with torch.no_grad():
        net.running_mean[1] = 0.25  # type: ignore[index]
        net.running_var[1] = 1e-8  # type: ignore[index]
    found = assert_same(net, x, mode="eval")
    assert {f.id for f in found} == {"tiny_running_var"}


def test_a_nan_channel_does_not_hide_a_shifted_one() -> None:
    """One value per channel (no std ratio): a NaN batch mean in one channel must not hide
    another channel's shift from the screen."""
    net = nn.BatchNorm1d(2).double().eval()
    with torch.no_grad():
        net.num_batches_tracked.fill_(5)  # type: ignore[union-attr]
    x = torch.tensor([[math.nan, 10.0]], dtype=torch.float64)  # channel 1: z = 10 > 6
    found = assert_same(net, x, mode="eval")
    assert "stats_shift" in {f.id for f in found}


def test_z_threshold_is_the_checks() -> None:
    ((call, _),) = _calls_and_results(nn.BatchNorm1d(2).eval(), torch.randn(1, 2))
    assert z_threshold(call) == 6.0  # a batch of one: its mean is one draw


# --- healthy layers take the short way --------------------------------------------------------------
@pytest.fixture
def no_vector_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def boom(*_a: object) -> None:
        raise AssertionError("a vector check ran on a healthy layer")

    for name in ("check_nonfinite", "check_nonpositive", "check_tiny", "check_untrained"):
        monkeypatch.setattr(health, name, boom)
    for name in ("check_shift", "check_fp16", "check_dead"):
        monkeypatch.setattr(health, name, boom)
    monkeypatch.setattr(health_checks.Layer, "vectors", boom)
    yield


@pytest.mark.usefixtures("no_vector_checks")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_healthy_layers_skip_the_vector_checks(mode: str) -> None:
    import models

    net = models.calibrate(models.resnet_tiny(), (8, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.2
    report = run(net, x, mode=mode)
    expected = set() if mode == "eval" else {"train_mode_layer"}
    assert {f.id for f in report.all_findings} == expected


# --- the pieces -------------------------------------------------------------------------------------
def test_as_vecs_is_as_vec() -> None:
    f16 = torch.tensor([1.5, -2.0], dtype=torch.float16)
    f32 = torch.tensor([0.1, 3.0])
    bf = torch.tensor([7.0, 0.3], dtype=torch.bfloat16)
    for ts in ([f32, None, f16, bf], [f32], [None, None], [f32, torch.ones(3)]):
        got, want = as_vecs(ts), [as_vec(t) for t in ts]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert (g is None and w is None) or (
                g is not None and w is not None and g.dtype == w.dtype and torch.equal(g, w)
            )


class Columns:
    """A `channels` that hands out columns as tensors, as the lazy ChannelTable does."""

    def __init__(self, objects: tuple[Any, ...]) -> None:
        self.objects = objects
        self.asked: list[str] = []

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        self.asked.append(name)
        vals = [getattr(c, name) for c in self.objects]
        return torch.tensor(vals, dtype=torch.float64, device=device)

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("the objects were made")

    def __len__(self) -> int:
        return len(self.objects)


def test_batch_moments_reads_columns_without_making_channel_objects() -> None:
    ((_, res),) = _calls_and_results(nn.BatchNorm2d(3).eval(), torch.randn(2, 3, 4, 4))
    want = batch_moments(res)
    cols = Columns(tuple(res.channels))
    m, v = batch_moments(replace(res, channels=cols))  # type: ignore[arg-type]
    assert cols.asked == ["batch_mean", "batch_var"]
    assert torch.equal(m, want[0]) and torch.equal(v, want[1])
    assert want[0].tolist() == [c.batch_mean for c in res.channels]


def test_functional_and_frozen_layers_agree_both_ways() -> None:
    class Functional(nn.Module):
        rm: torch.Tensor
        rv: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rm", torch.zeros(3))
            self.register_buffer("rv", torch.full((3,), 1e-9))
            self.w = nn.Parameter(torch.tensor([1.0, 0.0, 2.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.batch_norm(x, self.rm, self.rv, self.w, None, False, 0.1, 1e-5)
            return F.batch_norm(y, None, None, None, None, True, 0.1, 1e-5)

    found = assert_same(Functional(), torch.randn(4, 3, 2, 2) + 5.0)
    assert {"tiny_running_var", "dead_channel", "no_running_stats"} <= {f.id for f in found}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_buffers_agree_both_ways(dtype: torch.dtype) -> None:
    big = 6e4 if dtype == torch.float16 else 7e4  # float16 ends at 65504
    net = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        net.running_var.copy_(torch.tensor([1.0, big, 1e-7, 2.0]))  # type: ignore[union-attr]
        net.running_mean.copy_(torch.tensor([0.0, 0.1, 0.0, 30.0]))  # type: ignore[union-attr]
    found = assert_same(net.to(dtype), torch.randn(8, 4).to(dtype))
    want = {"tiny_running_var", "stats_shift"}
    if dtype == torch.bfloat16:
        want.add("fp16_overflow_risk")
    assert want <= {f.id for f in found}


# --- on a GPU (skipped without one): the screen's tensors live on the layer's device ---------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=60, deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])
@given(bn_case())
def test_the_screen_changes_no_finding_on_cuda(case: tuple[nn.Module, torch.Tensor, str]) -> None:
    net, x, mode = case
    assert_same(net.cuda(), x.cuda(), mode=mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("no_vector_checks")
def test_healthy_layers_skip_the_vector_checks_on_cuda() -> None:
    import models

    net = models.calibrate(models.resnet_tiny(), (8, 3, 32, 32)).cuda()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.2
    report = run(net, x.cuda(), mode="eval")
    assert {f.id for f in report.all_findings} <= {"tf32_convolutions"}
