"""The fused verdict's host arithmetic (bn_diff/fused_verdict.py) against the torch reference.

The verdict works on the pass's (C,) and (slots, C) results as NumPy float64 arrays; these tests
pin that it gives what the torch formulas give, bit for bit where the value is reported, and that
a channel with Inf or NaN does not disturb how the others are located.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_fused import assert_same, both, make_case  # noqa: E402

from bn_diff import kernels  # noqa: E402
from bn_diff.compare import allowance, rounding_allowance  # noqa: E402
from bn_diff.pipeline import make_tolerance  # noqa: E402
from bn_diff.recompute import F64  # noqa: E402

BIG = torch.finfo(F64).max  # `compare` reports an Inf difference as the largest float64


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def on(case: dict[str, object], device: str) -> dict[str, object]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


@pytest.fixture(params=["eager", "compiled"])
def policy(request: pytest.FixtureRequest) -> object:
    with kernels.using(str(request.param)):
        yield request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("shape", "target"),
    [((16, 12, 3, 3), None), ((16, 12, 3, 3), 64), ((4, 8, 64, 64), None), ((8, 4, 50, 50), None)],
)
def test_a_channel_with_inf_keeps_its_max_and_the_others_theirs(
    policy: object,
    device: str,
    train: bool,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    target: int | None,
) -> None:
    """y = Inf in the last channel: that channel goes through the reference path; before, its
    Inf margin made every slot a tie, and the search overwrote its max and others' with the
    maxima of the first few slots only."""
    case = on(make_case(shape, dtype, train, seed=7), device)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    y = y.clone()
    y.view(-1)[-1] = math.inf
    case["y"] = y
    fast = assert_same(case, make_tolerance(None, None), target=target)
    ref = both(case, make_tolerance(None, None), target)[1][2]
    assert float(fast.comparison.channel_max_abs[-1]) == BIG
    assert torch.equal(fast.comparison.channel_mismatched, ref.channel_mismatched)  # type: ignore[attr-defined]
    assert fast.comparison.max_abs_diff == BIG


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [False, True])
def test_a_channel_with_nan_leaves_the_others_located(
    policy: object, device: str, train: bool
) -> None:
    """x = NaN in one channel (its margin NaN): the greatest |Δ| of the clean channels is still
    found and located, as the reference finds it."""
    case = make_case((8, 16, 14, 14), torch.float32, train, seed=3)
    x, y = case["x"], case["y"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    x = x.clone()
    x[0, 5, 0, 0] = math.nan
    rm, rv, gamma, beta = (case[k] for k in ("rm", "rv", "gamma", "beta"))
    assert isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)
    assert isinstance(gamma, torch.Tensor) and isinstance(beta, torch.Tensor)
    f32 = torch.float32
    y = F.batch_norm(x, rm.to(f32), rv.to(f32), gamma.to(f32), beta.to(f32), train, 0.0, 1e-5)
    case["x"], case["y"] = x, y
    case = on(case, device)
    fast, (_, _, ref) = both(case, make_tolerance(None, None))
    fc = fast.comparison
    assert torch.equal(fc.channel_mismatched, ref.channel_mismatched)  # type: ignore[attr-defined]
    assert torch.allclose(fc.channel_max_abs, ref.channel_max_abs, rtol=1e-6, atol=1e-12)  # type: ignore[attr-defined]
    assert 0 < fc.max_abs_diff < 1e-3
    assert math.isclose(fc.max_abs_diff, ref.max_abs_diff, rel_tol=1e-6)  # type: ignore[attr-defined]
    assert fc.max_abs_index[1] == ref.max_abs_index[1]  # type: ignore[attr-defined]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_allowance_is_the_torch_formula_bit_for_bit(
    policy: object, train: bool, dtype: torch.dtype
) -> None:
    case = make_case((4, 24, 9, 9), dtype, train, seed=11, mean=3.0, std=0.5)
    tol = make_tolerance(None, None)
    fast = both(case, tol)[0]
    assert fast.exact_channels == 0  # every channel clean: the host values are the ones reported
    gamma, beta = case["gamma"], case["beta"]
    assert isinstance(gamma, torch.Tensor) and isinstance(beta, torch.Tensor)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    torch_allow = rounding_allowance(
        tol, y.dtype, fast.moments, fast.mean, fast.var, gamma, beta, 1e-5
    )
    assert torch.equal(fast.allowance, torch_allow)


floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(floats, floats, floats, floats, floats), min_size=1, max_size=40))
def test_allowance_same_on_numpy_and_torch(
    cols: list[tuple[float, float, float, float, float]],
) -> None:
    """`allowance` is one formula for torch tensors and NumPy arrays: the same bits."""
    absmax, mean, sd, gamma, beta = (np.array(c, dtype=np.float64) for c in zip(*cols, strict=True))
    tol = make_tolerance(None, None)
    with np.errstate(all="ignore"):
        host = allowance(tol, torch.float32, abs(absmax), mean, sd, gamma, beta)
    dev = allowance(
        tol,
        torch.float32,
        *(torch.from_numpy(a) for a in (abs(absmax), mean, sd, gamma, beta)),
    )
    assert torch.equal(torch.from_numpy(host), dev)


def _host_pair(
    train: bool, device: str = "cpu"
) -> tuple[object, object, float]:  # (host by the CPU branch, host by the transfer branch, eps)
    from bn_diff import fused
    from bn_diff.fused_verdict import Host

    case = on(make_case((4, 6, 7, 7), torch.float32, train, seed=11, mean=3.0), device)
    x, y, g, b = (case[k] for k in ("x", "y", "gamma", "beta"))
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    assert isinstance(g, torch.Tensor) and isinstance(b, torch.Tensor)
    xv, yv = fused.view3(x), fused.view3(y)
    assert xv is not None and yv is not None
    bn = fused.BnArgs(g, b, None, None, True, 1e-5)
    with kernels.using("eager"):
        part = fused.fused_pass(xv, yv, bn, 1 << 18)
    m = int(xv.shape[0] * xv.shape[2])
    # float32 gamma/beta send Host.of down its one-transfer branch (the GPU's), even on CPU
    return (
        Host.of(part, g, b, None, m, 1e-5),
        Host.of(part, g.float(), b.float(), None, m, 1e-5),
        1e-5,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_the_batch_root_is_the_root_of_the_reported_variance(device: str) -> None:
    """Host.of's two branches (CPU views; one transfer, the batch's root taken on the device)
    give the same statistics and, to the bit, torch.sqrt of the reported variance + eps on the
    layer's device. On CUDA a division by a Python number is a multiplication by its
    reciprocal: the transfer branch divides by a device tensor."""
    a, b, eps = _host_pair(True, device)
    for h in (a, b):
        assert h.batch_sd is not None  # type: ignore[attr-defined]
        want = torch.sqrt(torch.from_numpy(h.var).to(device) + eps).cpu().numpy()  # type: ignore[attr-defined]
        assert h.batch_sd.tobytes() == want.tobytes()  # type: ignore[attr-defined]
    assert a.var.tobytes() == b.var.tobytes()  # type: ignore[attr-defined]
    assert a.mean_p.tobytes() == b.mean_p.tobytes()  # type: ignore[attr-defined]


def test_host_views_of_float64_parameters_are_read_only() -> None:
    """On CPU Host.of reads gamma and beta in place; for a float64 model those are the model's
    own parameters, so the views refuse writes."""
    a, _, _ = _host_pair(True)
    for v in (a.gamma, a.beta):  # type: ignore[attr-defined]
        assert not v.flags.writeable
        with pytest.raises(ValueError):
            v[0] = 1.0
