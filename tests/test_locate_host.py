"""Locating the greatest differences on the host (bn_diff/fused_locate.py: `_gather`, `_diff`).

The fused verdict searches the few regions that can hold the greatest |Δ| and relative |Δ| in
NumPy float64. These tests pin that the host search gives what `compare`'s torch arithmetic
gives, bit for bit (values and first index), on every source it gathers from (NumPy views of
CPU tensors of any strides, or torch tensors: bfloat16, and CUDA's path), and that a whole check
locates the same elements as the reference path.
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

from test_fused import both, by_hand, make_case  # noqa: E402

from bn_diff import fused, fused_locate, kernels  # noqa: E402
from bn_diff.fused import fused_check, region  # noqa: E402
from bn_diff.pipeline import make_tolerance  # noqa: E402
from bn_diff.recompute import F64  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def torch_tops(
    x: torch.Tensor, y: torch.Tensor, cols: list[torch.Tensor]
) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """Per row: (value, first index) of the greatest |Δ| and relative |Δ|, with `compare`'s
    literal torch arithmetic and conventions (its masks included) and its argmax."""
    mean, sd, gamma, beta = cols
    e = (x.to(F64) - mean) / sd
    e = e * gamma + beta
    yy = y.to(F64)
    d = (yy - e).abs()
    same = (yy == e) | (yy.isnan() & e.isnan())
    d = torch.where(same, torch.zeros((), dtype=F64), d)
    d = torch.nan_to_num(d, nan=float("inf"))
    rel = torch.where(d == 0, torch.zeros((), dtype=F64), d / e.abs())
    rel = torch.nan_to_num(rel, nan=float("inf"))
    out: tuple[list[tuple[float, int]], list[tuple[float, int]]] = ([], [])
    for k in range(x.shape[0]):
        for a, dst in ((d[k], out[0]), (rel[k], out[1])):
            i = int(torch.argmax(a))
            dst.append((float(a[i]), i))
    return out


def bits(v: float) -> bytes:
    return np.float64(v).tobytes()


SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.0, 1e-300, 1e300, 6e4, math.inf, -math.inf, math.nan]
xs = st.one_of(st.sampled_from(SPECIAL), st.floats(-10, 10, width=32))
ys = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, 3.0, 1e300]), st.floats(-10, 10, width=32))
params = st.tuples(
    st.sampled_from([0.0, 1.0, 0.5, -3.0]),  # mean
    st.sampled_from([1.0, 0.5, 3.0, 1e-300, 1e300]),  # sd
    st.sampled_from([1.0, 0.0, -2.0, 1e300, 0.7]),  # gamma
    st.sampled_from([0.0, 1.0, -0.5, 1e-3]),  # beta
)


def draw_rows(
    k: int, m: int, data: st.DataObject, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:  # type: ignore[type-arg]
    """(k, m) rows of x and y in `dtype` (y finite, as in every region the verdict searches) and
    (4, k, 1) float64 mean, sd, gamma, beta of their channels."""
    x = torch.tensor(data.draw(st.lists(xs, min_size=k * m, max_size=k * m)), dtype=F64)
    y = torch.tensor(data.draw(st.lists(ys, min_size=k * m, max_size=k * m)), dtype=F64)
    x, y = x.to(dtype).reshape(k, m), y.to(dtype).reshape(k, m)
    y = torch.where(y.isfinite(), y, torch.zeros((), dtype=dtype))
    rows = [data.draw(params) for _ in range(k)]
    return x, y, np.array([[[r[j]] for r in rows] for j in range(4)], dtype=np.float64)


@settings(max_examples=300, deadline=None)
@given(
    k=st.integers(1, 3),
    m=st.integers(1, 12),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
)
def test_host_diff_is_compares_arithmetic_bit_for_bit(
    k: int, m: int, data: st.DataObject, dtype: torch.dtype
) -> None:
    """Ties, zeros, 0/0, e = ±Inf or NaN (x = ±Inf/NaN, overflow, gamma = 0 times Inf), in rows
    of every dtype: the same values and first indices as `compare`. y is finite, as in every
    region the verdict searches."""
    x, y, host_cols = draw_rows(k, m, data, dtype)
    cols = [torch.from_numpy(c) for c in host_cols]
    want = torch_tops(x, y, cols)
    with np.errstate(all="ignore"):
        got = fused_locate._diff(
            x.to(F64).numpy().copy(), y.to(F64).numpy().copy(), *(c.numpy() for c in cols)
        )
    for kind in (0, 1):
        values, where = got[kind]
        assert [(bits(v), i) for v, i in zip(values, where, strict=True)] == [
            (bits(v), i) for v, i in want[kind]
        ]


def _views(dtype: torch.dtype) -> list[torch.Tensor]:
    """(N, C, L) views of one tensor's values: contiguous, channels_last, a strided batch."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(4, 6, 5, 7, generator=g, dtype=F64).to(dtype)
    out = [t, t.contiguous(memory_format=torch.channels_last), _every_other_sample(t)]
    views = [fused.view3(v) for v in out]
    assert all(v is not None for v in views)
    return [v for v in views if v is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "fold", "split"])
def test_gather_reads_any_strides_and_the_tensor_path_alike(
    dtype: torch.dtype, layout: str
) -> None:
    """NumPy views (CPU float16/32/64) and the torch gather (bfloat16 on CPU; every dtype on CUDA:
    exercised here by handing it the tensor) give the same float64 rows."""
    for v in _views(dtype):
        n, c, length = v.shape
        if layout == "rows":
            regions = [(slice(s, s + 1), slice(0, length)) for s in (2, 0, 3)]
        elif layout == "fold":
            regions = [(slice(0, n), slice(0, length))] * 3
        else:
            regions = [region(k, n, length, 16) for k in (0, 5, 7)]
            regions = [r for r in regions if r[0].stop - r[0].start == 1][:1]
        chl = [4, 1, 5][: len(regions)]
        want = torch.stack([v[ns, ch, ls] for (ns, ls), ch in zip(regions, chl, strict=True)])
        want64 = want.to(F64).reshape(len(chl), -1).numpy()
        (src,) = fused_locate._source(v)
        assert isinstance(src, np.ndarray) == (dtype != torch.bfloat16)
        for s in (src, v):
            got = fused_locate._gather(s, regions, chl)
            assert got.dtype == np.float64 and got.shape == want64.shape
            assert got.tobytes() == want64.tobytes()


def _every_other_sample(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view that skips every other sample of a wider tensor."""
    wide = torch.zeros((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype)
    wide[::2] = t
    return wide[::2]


def _check_same_as_reference(case: dict[str, object], target: int | None = None) -> None:
    """Eval mode: the fused path normalizes with the reference's own statistics, so each greatest
    difference it reports is `compare`'s value at the element it names, to the bit; the greatest
    |Δ| is the reference's, value and index, and so is the greatest relative |Δ| but on float64
    layers (there the pass's relative differences, ulps of ulps, rank regions no better than
    their own rounding: a pre-existing limit of the search, unchanged by searching on the host)."""
    fast, (_, _, ref) = both(case, make_tolerance(None, None), target)
    fc = fast.comparison
    assert torch.equal(fc.channel_mismatched, ref.channel_mismatched)  # type: ignore[attr-defined]
    assert fast.exact_channels < int(fc.channel_max_abs.shape[0])  # some channels were located
    d, rel = by_hand(case, fast.mean, fast.var)
    assert bits(fc.max_abs_diff) == bits(float(d[fc.max_abs_index]))
    assert bits(fc.max_rel_diff) == bits(float(rel[fc.max_rel_index]))
    want = (ref.max_abs_diff, ref.max_abs_index)  # type: ignore[attr-defined]
    assert (bits(fc.max_abs_diff), fc.max_abs_index) == (bits(want[0]), want[1])
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    if x.dtype != torch.float64:
        want = (ref.max_rel_diff, ref.max_rel_index)  # type: ignore[attr-defined]
        assert (bits(fc.max_rel_diff), fc.max_rel_index) == (bits(want[0]), want[1])


@pytest.fixture(params=["eager", "compiled"])
def policy(request: pytest.FixtureRequest) -> object:
    with kernels.using(str(request.param)):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(
    ("shape", "target"), [((4, 6, 12, 12), None), ((4, 6, 5, 5), None), ((4, 6, 12, 12), 64)]
)
def test_ties_across_samples_locate_the_references_element(
    policy: object,
    dtype: torch.dtype,
    memory: str,
    shape: tuple[int, ...],
    target: int | None,
) -> None:
    """Every sample the same: each greatest difference is tied in every sample's region ("rows"),
    or several times in one ("fold", "split"); the first index wins, as in the reference. On
    channels_last and strided inputs (NumPy reads them in place) and bfloat16 (gathered by
    torch)."""
    case = make_case(shape, dtype, False, seed=21)
    x, y = case["x"], case["y"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    x, y = x[:1].expand_as(x).clone(), y[:1].expand_as(y).clone()
    if memory == "channels_last":
        x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
    elif memory == "strided":
        x, y = (_every_other_sample(t) for t in (x, y))
        assert not x.is_contiguous() and fused.view3(x) is not None
    case["x"], case["y"] = x, y
    _check_same_as_reference(case, target)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_over_zero_and_exact_outputs_locate_the_references_element(
    policy: object, dtype: torch.dtype
) -> None:
    """gamma = 0 and beta = 0 in some channels (e = 0, y = 0: relative 0/0 there), others
    exact: the relative maximum comes from the regions the pass could not rank."""
    case = make_case((3, 5, 6, 6), dtype, False, seed=4)
    gamma, beta = case["gamma"], case["beta"]
    assert isinstance(gamma, torch.Tensor) and isinstance(beta, torch.Tensor)
    gamma, beta = gamma.clone(), beta.clone()
    gamma[[1, 3]] = 0.0
    beta[[1, 3]] = 0.0
    x, rm, rv = case["x"], case["rm"], case["rv"]
    assert isinstance(x, torch.Tensor) and isinstance(rm, torch.Tensor)
    assert isinstance(rv, torch.Tensor)
    pdt = dtype if dtype == torch.float64 else torch.float32
    y = F.batch_norm(x, rm.to(pdt), rv.to(pdt), gamma.to(pdt), beta.to(pdt), False, 0.0, 1e-5)
    case["gamma"], case["beta"], case["y"] = gamma, beta, y.to(dtype)
    _check_same_as_reference(case)


def test_the_tensor_gather_gives_the_numpy_gathers_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's branch (gather in torch, one transfer) and the CPU one (NumPy views) are one
    verdict: forcing every tensor through the torch gather changes no bit."""
    case = make_case((4, 8, 9, 9), torch.float16, False, seed=8)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    y = y.clone()
    y[2, 3, 4, 4] += 0.25  # one mismatch: a located maximum and an exact channel
    case["y"] = y
    args = (case["x"], y, case["gamma"], case["beta"], case["rm"], case["rv"], False, 1e-5)
    tol = make_tolerance(None, None)
    a = fused_check(*args, tol)  # type: ignore[arg-type]
    monkeypatch.setattr(fused_locate, "_NUMPY_DTYPES", ())
    b = fused_check(*args, tol)  # type: ignore[arg-type]
    assert a is not None and b is not None
    ca, cb = a.comparison, b.comparison
    assert torch.equal(ca.channel_max_abs, cb.channel_max_abs)
    assert torch.equal(ca.channel_mismatched, cb.channel_mismatched)
    assert (ca.max_abs_diff, ca.max_abs_index) == (cb.max_abs_diff, cb.max_abs_index)
    assert (ca.max_rel_diff, ca.max_rel_index) == (cb.max_rel_diff, cb.max_rel_index)
    assert ca.mismatched == cb.mismatched == 1


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 3),
    m=st.integers(1, 12),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
)
def test_the_device_search_is_the_host_search_bit_for_bit(
    k: int, m: int, data: st.DataObject, dtype: torch.dtype
) -> None:
    """On a GPU the regions are searched in torch where they are (`_diff_on_device`); run here
    on CPU tensors, it gives `_diff`'s values and first indices, to the bit."""
    x2, y2, cols = draw_rows(k, m, data, dtype)
    x, y = x2.reshape(k, 1, m), y2.reshape(k, 1, m)
    regions = [(slice(i, i + 1), slice(0, m)) for i in range(k)]
    got = fused_locate._diff_on_device(x, y, regions, [0] * k, cols)
    with np.errstate(all="ignore"):
        want = fused_locate._diff(
            x.reshape(k, m).to(F64).numpy().copy(),
            y.reshape(k, m).to(F64).numpy().copy(),
            *cols,
        )
    for kind in (0, 1):
        assert [bits(v) for v in got[kind][0]] == [bits(v) for v in want[kind][0]]
        assert got[kind][1] == want[kind][1]


@pytest.mark.parametrize("layout_shape", [(4, 8, 9, 9), (3, 4, 50, 50), (16, 6, 2, 2)])
def test_the_device_branch_gives_the_host_branchs_verdict(
    monkeypatch: pytest.MonkeyPatch, layout_shape: tuple[int, ...]
) -> None:
    case = make_case(layout_shape, torch.float32, True, seed=4)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    y = y.clone()
    y.view(-1)[7] += 0.25
    case["y"] = y
    args = (case["x"], y, case["gamma"], case["beta"], case["rm"], case["rv"], True, 1e-5)
    tol = make_tolerance(None, None)
    a = fused_check(*args, tol)  # type: ignore[arg-type]
    monkeypatch.setattr(fused_locate, "_search_on_device", lambda src: True)
    monkeypatch.setattr(fused_locate, "_NUMPY_DTYPES", ())
    b = fused_check(*args, tol)  # type: ignore[arg-type]
    assert a is not None and b is not None
    ca, cb = a.comparison, b.comparison
    assert torch.equal(ca.channel_max_abs, cb.channel_max_abs)
    assert (ca.max_abs_diff, ca.max_abs_index) == (cb.max_abs_diff, cb.max_abs_index)
    assert (ca.max_rel_diff, ca.max_rel_index) == (cb.max_rel_diff, cb.max_rel_index)
    assert ca.mismatched == cb.mismatched
