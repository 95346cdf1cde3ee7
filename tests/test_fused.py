"""The fused float64 pass (bn_diff/fused*.py) against the reference path (channel_moments, then
compare): same mismatch counts, same per-channel max |Δ| and statistics up to float64 rounding,
same greatest differences and where they are."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bn_diff import fused
from bn_diff.fused import fused_check
from bn_diff.layer_check import reference_check
from bn_diff.pipeline import make_tolerance
from bn_diff.recompute import F64
from bn_diff.results import Tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_case(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    seed: int,
    mean: float = 0.0,
    std: float = 1.0,
) -> dict[str, object]:
    """x, PyTorch's honest BN output y, and float64 parameters for one BN call."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=F64) * std + mean).to(dtype)
    gamma = torch.rand(c, generator=g, dtype=F64) * 1.5 + 0.25
    beta = torch.rand(c, generator=g, dtype=F64) - 0.5
    rm = mean + std * (torch.rand(c, generator=g, dtype=F64) - 0.5) * 0.2
    rv = std**2 * (torch.rand(c, generator=g, dtype=F64) + 0.5)
    pdt = dtype if dtype == torch.float64 else torch.float32
    y = F.batch_norm(x, rm.to(pdt), rv.to(pdt), gamma.to(pdt), beta.to(pdt), train, 0.0, 1e-5)
    return {"x": x, "y": y, "gamma": gamma, "beta": beta, "rm": rm, "rv": rv, "train": train}


def both(
    case: dict[str, object], tol: Tolerance, target: int | None = None
) -> tuple[fused.FusedResult, tuple[object, torch.Tensor, object]]:
    args = (
        case["x"],
        case["y"],
        case["gamma"],
        case["beta"],
        case["rm"],
        case["rv"],
        case["train"],
        1e-5,
        tol,
    )
    fast = fused_check(*args, target=target)  # type: ignore[arg-type]
    assert fast is not None
    return fast, reference_check(*args)  # type: ignore[arg-type]


def by_hand(case: dict[str, object], mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """|y - e| and |y - e|/|e| elementwise, with compare's arithmetic and conventions."""
    x, y = case["x"], case["y"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    nd = x.dim()

    def col(v: object) -> torch.Tensor:
        assert isinstance(v, torch.Tensor)
        return v.reshape((1, -1) + (1,) * (nd - 2))

    e = (x.to(F64) - col(mean)) / torch.sqrt(col(var) + 1e-5) * col(case["gamma"]) + col(
        case["beta"]
    )
    yy = y.to(F64)
    d = (yy - e).abs()
    d = torch.where((yy == e) | (yy.isnan() & e.isnan()), 0.0, d).nan_to_num(nan=math.inf)
    rel = torch.where(d == 0, 0.0, d / e.abs()).nan_to_num(nan=math.inf)
    return torch.stack([d, rel])


def assert_same(
    case: dict[str, object], tol: Tolerance, target: int | None = None
) -> fused.FusedResult:
    fast, (mom, allow, cmp) = both(case, tol, target)
    fc = fast.comparison
    # the verdict: mismatch counts, exactly
    assert torch.equal(fc.channel_mismatched, cmp.channel_mismatched)  # type: ignore[attr-defined]
    assert fc.mismatched == cmp.mismatched  # type: ignore[attr-defined]
    # statistics, allowance and max |Δ| per channel: up to float64 rounding
    ref_mean, ref_var = mom.mean, mom.var  # type: ignore[attr-defined]
    spread = ref_var.sqrt() + ref_mean.abs() + 1e-300
    assert torch.allclose(fast.moments.mean, ref_mean, rtol=0, atol=0, equal_nan=True) or bool(
        ((fast.moments.mean - ref_mean).abs() <= 1e-12 * spread).all()
    )
    assert bool(((fast.moments.var - ref_var).abs() <= 1e-10 * ref_var + 1e-15 * spread**2).all())
    assert torch.equal(fast.moments.min, mom.min)  # type: ignore[attr-defined]
    assert torch.equal(fast.moments.max, mom.max)  # type: ignore[attr-defined]
    assert torch.allclose(fast.allowance, allow, rtol=1e-9, atol=0)
    scale = float(by_hand(case, fast.mean, fast.var)[0].nan_to_num(posinf=0).max()) + 1.0
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    big = float(x.to(F64).abs().max()) * float(fast.mean.abs().max() + 1)  # magnitudes summed
    assert torch.allclose(
        fc.channel_max_abs,
        cmp.channel_max_abs,  # type: ignore[attr-defined]
        rtol=1e-6,
        atol=1e-13 * (scale + big),
    )
    # the greatest differences: the same value, at an element that holds it, up to the float64
    # rounding of |Δ| (delta); relative differences inherit it, divided by |e|
    delta = 1e-13 * (scale + big)
    d, rel = by_hand(case, fast.mean, fast.var)
    e_abs = torch.where(rel > 0, d / rel, math.inf)
    assert math.isclose(fc.max_abs_diff, cmp.max_abs_diff, rel_tol=1e-6, abs_tol=delta)  # type: ignore[attr-defined]
    assert math.isclose(float(d[fc.max_abs_index]), cmp.max_abs_diff, rel_tol=1e-6, abs_tol=delta)  # type: ignore[attr-defined]
    hi = torch.where(d.isinf(), math.inf, (d + delta) / e_abs).max()
    lo = ((d - delta).clamp_min(0) / e_abs).nan_to_num(nan=0.0).max()
    assert (
        float(lo) * (1 - 1e-6) <= fc.max_rel_diff <= float(hi) * (1 + 1e-6)
        or fc.max_rel_diff == cmp.max_rel_diff
    )  # type: ignore[attr-defined]
    j = fc.max_rel_index
    assert (
        float(d[j] + delta) / float(e_abs[j]) >= float(lo) * (1 - 1e-6)
        or float(rel[j]) == cmp.max_rel_diff
    )  # type: ignore[attr-defined]
    return fast


shapes = st.integers(min_value=2, max_value=5).flatmap(
    lambda nd: st.tuples(
        st.integers(1, 5), st.integers(1, 6), *[st.integers(1, 7) for _ in range(nd - 2)]
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    train=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    target=st.sampled_from([None, 1, 7, 40, 300]),
    offset=st.sampled_from([(0.0, 1.0), (1000.0, 0.1), (3.0, 0.5)]),
    explicit=st.booleans(),
)
def test_fused_equals_reference(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    seed: int,
    target: int | None,
    offset: tuple[float, float],
    explicit: bool,
) -> None:
    m = shape[0] * math.prod(shape[2:])
    if train and m < 2:
        return  # PyTorch refuses train mode with one value per channel
    case = make_case(shape, dtype, train, seed, *offset)
    tol = make_tolerance(1e-5, 1e-4) if explicit else make_tolerance(None, None)
    assert_same(case, tol, target)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    train=st.booleans(),
    over=st.booleans(),
    where=st.integers(0, 10_000),
    seed=st.integers(0, 2**31 - 1),
    target=st.sampled_from([None, 30]),
)
def test_one_element_just_over_or_under_the_tolerance(
    dtype: torch.dtype, train: bool, over: bool, where: int, seed: int, target: int | None
) -> None:
    """One element a single representable step over (or at most at) its allowed difference is
    counted (or not) exactly as the float64 reference counts it."""
    case = make_case((3, 4, 5, 6), dtype, train, seed)
    tol = make_tolerance(None, None)
    _, (mom, allow, _) = both(case, tol, target)
    mean = mom.mean if train else case["rm"]  # type: ignore[attr-defined]
    var = mom.var if train else case["rv"]  # type: ignore[attr-defined]
    assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
    x, y = case["x"], case["y"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    flat = where % x.numel()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
    ch = idx[1]
    atol, rtol = {
        torch.float32: (1e-5, 1.3e-6),
        torch.float64: (1e-7, 1e-7),
        torch.bfloat16: (1e-5, 1.6e-2),
    }[dtype]
    # e and the allowed difference with compare's own torch arithmetic (not Python floats:
    # torch's broadcast division may round differently by an ulp)
    nd = x.dim()
    col = (1, -1) + (1,) * (nd - 2)
    e_all = (x.to(F64) - mean.view(col)) / torch.sqrt(var.view(col) + 1e-5)
    g, b = case["gamma"], case["beta"]
    assert isinstance(g, torch.Tensor) and isinstance(b, torch.Tensor)
    e_all = e_all * g.view(col) + b.view(col)
    thr_all = atol + rtol * e_all.abs() + allow.view(col)
    e, thr = e_all[idx], float(thr_all[idx])
    # the representable values of y's dtype around e + thr: the first above, the last at or below
    cand = (e + thr).to(dtype)
    values = [cand]
    for _ in range(3):
        values.append(torch.nextafter(values[-1], torch.tensor(math.inf, dtype=dtype)))
        values.insert(0, torch.nextafter(values[0], torch.tensor(-math.inf, dtype=dtype)))
    diffs = [(float((v.to(F64) - e).abs()), v) for v in values if float(v.to(F64) - e) > 0]
    pick = (
        min((p for p in diffs if p[0] > thr), key=lambda p: p[0])
        if over
        else max((p for p in diffs if p[0] <= thr), key=lambda p: p[0])
    )
    y2 = y.clone()
    y2[idx] = pick[1]
    case["y"] = y2
    fast = assert_same(case, tol, target)
    assert int(fast.comparison.channel_mismatched[ch]) == (1 if over else 0)


def test_cancellation_prone_statistics_are_float64_accurate() -> None:
    """Mean 1000, std 0.1: the batch statistics match the float64 reference (and an exact
    rational computation) to float64 accuracy, not float32's."""
    from fractions import Fraction

    case = make_case((8, 3, 12, 12), torch.float32, True, 3, 1000.0, 0.1)
    fast = assert_same(case, make_tolerance(None, None))
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    for c in range(3):
        vals = [Fraction(v) for v in x[:, c].double().flatten().tolist()]
        mu = sum(vals) / len(vals)
        var = sum((v - mu) ** 2 for v in vals) / len(vals)
        assert abs(float(fast.moments.mean[c]) - float(mu)) <= 1e-15 * 1000
        assert abs(float(fast.moments.var[c]) - float(var)) <= 1e-12 * float(var)
    assert fast.exact_channels == 0  # no fallback needed: the pivot keeps the digits


@pytest.mark.parametrize("train", [True, False])
def test_a_poor_pivot_is_summed_again_not_sent_to_the_reference(train: bool) -> None:
    """Values at the positions the pivot is sampled from sit far from the rest (0 among
    1000 ± 0.1): the first sums lose digits, so the channel is summed again around its mean."""
    case = make_case((8, 2, 16, 16), torch.float32, train, 5, 1000.0, 0.1)
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    x = x.clone()
    x.view(8, 2, 256)[::2, :, ::32] = 0.0  # exactly where fused._pivot samples
    pdt = torch.float32
    case["x"] = x
    case["y"] = F.batch_norm(
        x,
        case["rm"].to(pdt),
        case["rv"].to(pdt),  # type: ignore[union-attr]
        case["gamma"].to(pdt),
        case["beta"].to(pdt),
        train,
        0.0,
        1e-5,
    )  # type: ignore[union-attr]
    xv = fused.view3(x)
    assert xv is not None and float(fused._pivot(xv)[0]) < 10  # the sample is all zeros
    fast = assert_same(case, make_tolerance(None, None))
    assert fast.exact_channels == 0


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("policy", ["eager", "compiled"])
def test_scattered_poor_pivots_get_one_more_pass_over_the_layer(
    train: bool, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other channel sits at 1000 ± 0.1 while the pivot says 0: more runs of poorly
    pivoted channels than MAX_REDO_SPANS, so the layer is summed once more, whole, and the
    result is still the reference's."""
    from bn_diff import kernels

    case = make_case((4, 12, 16, 16), torch.float32, train, 9)
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    x = x.clone()
    x[:, ::2] = x[:, ::2] * 0.1 + 1000.0
    rm, rv = case["rm"], case["rv"]
    assert isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)
    rm[::2] += 1000.0
    rv[::2] *= 0.01
    f32 = torch.float32
    g, b = case["gamma"], case["beta"]
    assert isinstance(g, torch.Tensor) and isinstance(b, torch.Tensor)
    case["x"] = x
    case["y"] = F.batch_norm(x, rm.to(f32), rv.to(f32), g.to(f32), b.to(f32), train, 0.0, 1e-5)
    monkeypatch.setattr(fused, "_pivot", lambda xv: torch.zeros(int(xv.shape[1]), dtype=F64))
    passes: list[int] = []
    real = fused.fused_pass

    def counted(xv: torch.Tensor, *a: object, **k: object) -> fused.Partials:
        passes.append(int(xv.shape[1]))
        return real(xv, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(fused, "fused_pass", counted)
    with kernels.using(policy):
        fast = assert_same(case, make_tolerance(None, None))
    # the compiled kernel redoes the layer itself (`_compiled_pass`), the eager pass by fused_pass
    assert passes == ([12, 12] if policy == "eager" else [12]) and fast.exact_channels == 0


@pytest.mark.parametrize("train", [True, False])
def test_nan_and_inf_follow_the_reference(train: bool) -> None:
    case = make_case((4, 5, 3, 3), torch.float32, train, 0)
    x, y = case["x"], case["y"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    x = x.clone()
    y = y.clone()
    x[1, 0, 1, 1] = math.nan
    x[2, 1, 0, 0] = math.inf
    y[0, 2, 2, 2] = math.nan
    y[3, 3, 0, 1] = -math.inf
    case["x"], case["y"] = x, y
    fast, (mom, _, cmp) = both(case, make_tolerance(None, None))
    assert torch.equal(fast.comparison.channel_mismatched, cmp.channel_mismatched)  # type: ignore[attr-defined]
    assert torch.equal(fast.comparison.channel_max_abs.isinf(), cmp.channel_max_abs.isinf())  # type: ignore[attr-defined]
    assert fast.comparison.max_abs_diff == cmp.max_abs_diff == math.inf  # type: ignore[attr-defined]
    assert fast.comparison.max_abs_index == cmp.max_abs_index  # type: ignore[attr-defined]
    assert torch.equal(fast.moments.mean.isnan(), mom.mean.isnan())  # type: ignore[attr-defined]


def test_zero_input_fresh_bn_eval_takes_no_fallback() -> None:
    """All-zero x through a fresh BN (running mean 0, beta 0): e = y = 0 everywhere, so every
    relative difference is 0/0 -> 0, without sending the layer down the reference path."""
    x = torch.zeros(2, 3, 4, 4)
    y = F.batch_norm(x, torch.zeros(3), torch.ones(3), None, None, False)
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    case = {"x": x, "y": y, "gamma": ones, "beta": zeros, "rm": zeros, "rv": ones, "train": False}
    fast = assert_same(case, make_tolerance(None, None))
    assert fast.exact_channels == 0
    assert fast.comparison.max_rel_diff == 0.0 and fast.comparison.max_abs_index == (0, 0, 0, 0)


def test_faulty_channels_take_the_reference_path_and_clean_ones_do_not() -> None:
    case = make_case((4, 6, 5, 5), torch.float32, False, 1)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    y = y.clone()
    y[:, 2] += 1e-3  # a whole channel off
    y[1, 4, 2, 3] -= 0.5  # one element off
    case["y"] = y
    fast = assert_same(case, make_tolerance(None, None))
    assert fast.exact_channels == 2
    assert fast.comparison.channel_mismatched.tolist() == [0, 0, 100, 0, 1, 0]
    assert fast.comparison.max_abs_index == (1, 4, 2, 3)


def test_views_that_are_not_n_c_l_fall_back_to_the_reference() -> None:
    case = make_case((3, 4, 5, 6), torch.float32, True, 2)
    x, y = case["x"], case["y"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    odd = x.transpose(2, 3).contiguous().transpose(2, 3)[..., ::2]  # strides with no (N, C, L) view
    assert fused.view3(odd) is None
    assert (
        fused_check(
            odd,
            y[..., ::2],
            case["gamma"],
            case["beta"],
            None,
            None,
            True,
            1e-5,  # type: ignore[arg-type]
            make_tolerance(None, None),
        )
        is None
    )
    # channels_last is an (N, C, L) view: the fused path applies, and agrees
    case["x"] = x.contiguous(memory_format=torch.channels_last)
    case["y"] = y.contiguous(memory_format=torch.channels_last)
    assert_same(case, make_tolerance(None, None))


def test_run_on_a_network_matches_the_reference_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """bn_diff.run with the fused path and with the reference path only: the same report."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import models

    import bn_diff
    from bn_diff import layer_check

    net = models.calibrate(
        models.ResNetStyle(blocks=(1, 1, 1, 1), width=8, num_classes=10), (4, 3, 32, 32)
    )
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in ("eval", "train"):
        fast = bn_diff.run(net, x, mode=mode).to_json()
        with monkeypatch.context() as mp:
            mp.setattr(layer_check, "fused_check", lambda *a, **k: None)
            ref = bn_diff.run(net, x, mode=mode).to_json()
        assert fast["ok"] == ref["ok"]
        for lf, lr in zip(fast["layers"], ref["layers"], strict=True):
            assert lf["mismatched"] == lr["mismatched"]
            assert math.isclose(lf["max_abs_diff"], lr["max_abs_diff"], rel_tol=1e-6)
            assert lf["max_abs_index"] == lr["max_abs_index"]
            assert lf["max_rel_index"] == lr["max_rel_index"]
            for cf, cr in zip(lf["channels"], lr["channels"], strict=True):
                assert cf["mismatched"] == cr["mismatched"]
                assert math.isclose(cf["batch_mean"], cr["batch_mean"], rel_tol=1e-9, abs_tol=1e-12)
                assert math.isclose(cf["batch_var"], cr["batch_var"], rel_tol=1e-9)
                assert math.isclose(
                    cf["max_abs_diff"], cr["max_abs_diff"], rel_tol=1e-6, abs_tol=1e-13
                )


def test_block_sizes_per_device() -> None:
    """On a GPU the blocks are large (few kernel launches); on CPU they follow the threads."""
    assert fused.block_elems(torch.device("cuda")) == fused.CUDA_BLOCK
    assert fused.block_elems(torch.device("cpu")) == fused.CPU_BLOCK * min(
        4, max(1, torch.get_num_threads())
    )


@pytest.mark.parametrize("train", [True, False])
def test_gpu_block_configuration_on_cpu(train: bool) -> None:
    """The configuration a CUDA tensor gets (one block per layer here), exercised on CPU."""
    case = make_case((6, 10, 9, 11), torch.float32, train, 4)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    y = y.clone()
    y[2, 3, 4, 5] += 0.01
    case["y"] = y
    fast = assert_same(case, make_tolerance(None, None), target=fused.CUDA_BLOCK)
    assert fast.comparison.max_abs_index == (2, 3, 4, 5) and fast.exact_channels == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("train", [True, False])
def test_fused_on_cuda_equals_reference(train: bool) -> None:
    case = make_case((4, 6, 7, 7), torch.float32, train, 6)
    case = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    assert_same(case, make_tolerance(None, None))
