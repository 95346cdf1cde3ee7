"""check_call's tail on the host (NumPy) gives the bits the torch formulas gave.

`ref_*` below are the torch formulas check_call used before its tail moved to the host (kept
here as the reference): the train/eval gap, the running-update check, the NaN-ignoring max and
the ChannelTable. Every case compares the whole LayerResult (repr: NaN and -0.0 included), or a
RunningUpdate field by field, with what the reference gives.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import replace
from typing import Any

import models
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bn_diff import layer_check, pipeline
from bn_diff.capture import BnCall, Capture
from bn_diff.channel_table import ChannelTable
from bn_diff.compare import Comparison, absdiff, dtype_name, resolve
from bn_diff.oddities import empty_batch, empty_update
from bn_diff.recompute import Moments, as_f64, coefficients, running_update
from bn_diff.results import LayerInfo, LayerResult, RunningUpdate, Tolerance

F64 = torch.float64
TOL = pipeline.make_tolerance(None, None)


# --- the reference: check_call's torch formulas -----------------------------------------------
def ref_train_eval_gap(
    call: BnCall,
    mom: Moments,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rm: torch.Tensor | None,
    rv: torch.Tensor | None,
) -> torch.Tensor | None:
    if rm is None or rv is None or mom.count == 0:
        return None
    a_b, b_b = coefficients(mom.mean, mom.var, gamma, beta, call.eps)
    a_r, b_r = coefficients(rm, rv, gamma, beta, call.eps)
    da, db = a_r - a_b, b_r - b_b
    return torch.maximum((da * mom.min + db).abs(), (da * mom.max + db).abs())


def ref_running_update(call: BnCall, mom: Moments) -> RunningUpdate | None:
    rm0, rv0 = call.running_mean_before, call.running_var_before
    rm1, rv1 = call.running_mean_after, call.running_var_after
    if rm0 is None or rv0 is None or rm1 is None or rv1 is None:
        return None
    exp = running_update(rm0, rv0, call.num_batches_tracked_before, mom, call.momentum)
    fin = torch.finfo(rm1.dtype) if rm1.dtype.is_floating_point else torch.finfo(torch.float32)
    k = exp.momentum_used
    m = mom.count
    scale_m = rm0.double().abs() + k * mom.absmax + exp.mean.abs()
    unb = m / (m - 1) if m > 1 else 1.0
    scale_v = rv0.double().abs() + k * unb * mom.absmax**2 + exp.var.abs()
    dm = absdiff(rm1, exp.mean)
    dv = absdiff(rv1, exp.var)
    ok_m = bool((dm <= 4 * fin.eps * scale_m.nan_to_num(nan=0.0) + 1e-12).all().item())
    ok_v = bool((dv <= 4 * fin.eps * scale_v.nan_to_num(nan=0.0) + 1e-12).all().item())
    nbt_ok = (
        exp.num_batches_tracked is None or exp.num_batches_tracked == call.num_batches_tracked_after
    )
    return RunningUpdate(
        momentum_used=k,
        max_abs_diff_mean=float(dm.max().item()) if dm.numel() else 0.0,
        max_abs_diff_var=float(dv.max().item()) if dv.numel() else 0.0,
        num_batches_tracked_ok=nbt_ok,
        ok=ok_m and ok_v and nbt_ok,
        largest_mean_change=float((rm1.double() - rm0.double()).abs().max().item()),
        largest_var_change=float((rv1.double() - rv0.double()).abs().max().item()),
    )


def ref_nanmax(t: torch.Tensor) -> float:
    v = float(t.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).max().item())
    return math.nan if v == -math.inf and bool(t.isnan().all().item()) else v


def ref_check_call(call: BnCall, tol: Tolerance) -> LayerResult:
    x, y = call.x.detach(), call.y.detach()
    c = int(x.shape[1]) if x.dim() >= 2 else 1
    if x.dim() < 2:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
        c = int(x.shape[1])
    dev = x.device
    gamma = as_f64(call.weight, c, 1.0, dev)
    beta = as_f64(call.bias, c, 0.0, dev)
    rm = None if call.running_mean_before is None else as_f64(call.running_mean_before, c, 0, dev)
    rv = None if call.running_var_before is None else as_f64(call.running_var_before, c, 1, dev)
    atol, rtol = resolve(tol, y.dtype)
    fast = layer_check.fused_check(x, y, gamma, beta, rm, rv, call.use_batch_stats, call.eps, tol)
    if fast is not None:
        mom, allow, cmp = fast.moments, fast.allowance, fast.comparison
    else:
        mom, allow, cmp = layer_check.reference_check(
            x, y, gamma, beta, rm, rv, call.use_batch_stats, call.eps, tol
        )
    gaps = ref_train_eval_gap(call, mom, gamma, beta, rm, rv)
    update = None
    if call.updates_running_stats:
        update = ref_running_update(call, mom) if mom.count else empty_update(call)
    info = LayerInfo(
        name=call.name,
        type=call.type,
        mode="train" if call.training else "eval",
        stats="batch" if (call.use_batch_stats or rm is None) else "running",
        num_features=c,
        eps=call.eps,
        momentum=call.momentum,
        affine=call.affine,
        track_running_stats=call.track_running_stats,
        producer=call.producer,
        dtype=dtype_name(y.dtype),
        shape=tuple(int(s) for s in x.shape),
        weight_frozen=layer_check._frozen(call),
        num_batches_tracked=call.num_batches_tracked_before,
    )
    channels = ChannelTable.from_columns(
        batch_mean=mom.mean,
        batch_var=mom.var,
        running_mean=rm,
        running_var=rv,
        gamma=None if call.weight is None else gamma,
        beta=None if call.bias is None else beta,
        max_abs_diff=cmp.channel_max_abs,
        mismatched=cmp.channel_mismatched,
        tolerance=allow,
        train_eval_gap=gaps,
    )
    return LayerResult(
        findings=empty_batch(call) if mom.count == 0 else (),
        info=info,
        channels=channels,
        numel=cmp.numel,
        mismatched=cmp.mismatched,
        max_abs_diff=cmp.max_abs_diff,
        max_abs_index=cmp.max_abs_index,
        max_rel_diff=cmp.max_rel_diff,
        max_rel_index=cmp.max_rel_index,
        atol=atol,
        rtol=rtol,
        train_eval_gap=None if gaps is None or gaps.numel() == 0 else ref_nanmax(gaps),
        running_update=update,
    )


# --- helpers --------------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Equal to the bit where it shows: repr (NaN, inf, -0.0 and every float's digits)."""
    return repr(a) == repr(b)


def calls_of(model: nn.Module, x: torch.Tensor, train: bool) -> list[BnCall]:
    out: list[BnCall] = []
    model.train(train)
    with torch.no_grad(), Capture(model, out.append, mode="as-is"):
        model(x)
    return out


def check_both(call: BnCall) -> None:
    with np.errstate(all="raise"):  # the tail must not leak NumPy's state or warnings
        got = layer_check.check_call(call, TOL)
    want = ref_check_call(call, TOL)
    assert same(got, want), (call.name, got, want)
    assert same(got.to_json(), want.to_json())
    assert same(tuple(got.channels), tuple(want.channels))
    for name in ("mismatched", "batch_mean", "train_eval_gap", "gamma", "running_var"):
        a, b = got.channels.tensor(name), want.channels.tensor(name)
        assert (a is None) == (b is None), name
        if a is not None and b is not None:
            assert a.dtype == b.dtype and same(a.tolist(), b.tolist()), name


def bn_net(dtype: torch.dtype = torch.float32, **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, **kw), nn.ReLU(), nn.BatchNorm2d(6))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 2.0)
                nn.init.uniform_(m.bias, -1.0, 1.0)
            if m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.to(dtype)


# --- whole calls ------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": None},
        {"momentum": 0.7},
        {"affine": False},
        {"track_running_stats": False},
    ],
)
def test_calls_match_the_torch_formulas(train: bool, kw: dict[str, Any]) -> None:
    net = bn_net(**kw)
    x = torch.randn(4, 3, 9, 9)
    for _ in range(2):  # momentum None: num_batches_tracked 0, then 1
        for call in calls_of(net, x, train):
            check_both(call)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("train", [True, False])
def test_low_and_high_precision_buffers(dtype: torch.dtype, train: bool) -> None:
    net = bn_net(dtype)
    x = torch.randn(4, 3, 9, 9).to(dtype)
    for call in calls_of(net, x, train):
        check_both(call)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs(train: bool, bad: float) -> None:
    net = bn_net()
    x = torch.randn(4, 3, 9, 9)
    x[0, 0, 0, 0] = bad
    x[2, 1, 3, 3] = bad
    x[:, 2] = bad  # a whole channel
    for call in calls_of(net, x, train):
        check_both(call)


def test_empty_batch_and_bn1d_shapes() -> None:
    torch.manual_seed(1)
    bn1 = nn.BatchNorm1d(5)
    for train in (True, False):
        for x in (torch.randn(6, 5), torch.randn(3, 5, 4), torch.randn(0, 5)):
            for call in calls_of(bn1, x, train):
                check_both(call)


def test_functional_batch_norm_and_resnet_calls() -> None:
    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))
            self.w = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.batch_norm(x, self.rm, self.rv, self.w, None, self.training)
            return nn.functional.batch_norm(y, None, None, None, None, True)

    x = torch.randn(3, 4, 5)
    for train in (True, False):
        for call in calls_of(Fn(), x, train):
            check_both(call)
    net = models.calibrate(models.resnet_tiny(), (4, 3, 16, 16), batches=1)
    for train in (True, False):
        for call in calls_of(net, torch.randn(2, 3, 16, 16), train):
            check_both(call)


def test_running_buffers_written_wrong() -> None:
    net = bn_net()
    x = torch.randn(4, 3, 9, 9)
    call = calls_of(net, x, True)[0]
    rm1, rv1 = call.running_mean_after, call.running_var_after
    assert rm1 is not None and rv1 is not None
    variants = {
        "off by a little": (rm1 + 1e-7, rv1),
        "off by a lot": (rm1, rv1 * 3),
        "NaN after": (torch.where(torch.arange(6) == 2, math.nan, rm1), rv1),
        "inf after": (rm1, torch.where(torch.arange(6) == 4, math.inf, rv1)),
        "untouched": (call.running_mean_before, call.running_var_before),
    }
    for name, (m1, v1) in variants.items():
        bad = replace(call, running_mean_after=m1.clone(), running_var_after=v1.clone())
        check_both(bad)
        assert layer_check.check_call(bad, TOL).running_update is not None, name
    wrong_count = replace(call, num_batches_tracked_after=(call.num_batches_tracked_after or 0) + 5)
    check_both(wrong_count)


# --- the running-update check alone, on statistics no forward gives -------------------------
def fake_call(
    c: int,
    dtype: torch.dtype,
    momentum: float | None,
    nbt: int | None,
    rm0: torch.Tensor,
    rv0: torch.Tensor,
    rm1: torch.Tensor,
    rv1: torch.Tensor,
) -> BnCall:
    x = torch.zeros(2, c)
    return BnCall(
        name="bn",
        type="BatchNorm1d",
        x=x,
        y=x,
        training=True,
        use_batch_stats=True,
        weight=None,
        bias=None,
        running_mean_before=rm0.to(dtype),
        running_var_before=rv0.to(dtype),
        num_batches_tracked_before=nbt,
        running_mean_after=rm1.to(dtype),
        running_var_after=rv1.to(dtype),
        num_batches_tracked_after=None if nbt is None else nbt + 1,
        eps=1e-5,
        momentum=momentum,
        affine=False,
        track_running_stats=True,
        updates_running_stats=True,
        producer=None,
        module=None,
    )


def tail_update(call: BnCall, mom: Moments) -> RunningUpdate | None:
    """pipeline's host path for the running update, on given statistics."""
    c = int(mom.mean.numel())
    g, b, rm, rv, after = layer_check._params(call, c, torch.device("cpu"))
    zeros = torch.zeros(c, dtype=F64)
    cmp = Comparison(zeros, torch.zeros(c, dtype=torch.int64), 0, 0, 0.0, (0,), 0.0, (0,))
    h, _ = layer_check._host_rows(mom, zeros, cmp, g, b, rm, rv, after, call.eps)
    with np.errstate(all="ignore"):
        return layer_check._check_running_update(call, mom.count, h)


SPECIAL = [0.0, -0.0, 1.0, -2.5, 1e-300, 1e300, math.inf, -math.inf, math.nan, 3.0e38, 70000.0]
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from(SPECIAL),
    st.floats(-4, 4),
)


@settings(max_examples=300, deadline=None)
@given(
    c=st.integers(1, 6),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    momentum=st.sampled_from([None, 0.1, 0.0, 1.0, 0.3333, -0.5, 1.5]),
    nbt=st.sampled_from([None, 0, 1, 7]),
    count=st.sampled_from([0, 1, 2, 3, 1000]),
    near=st.booleans(),
)
def test_running_update_matches_the_torch_formulas(
    c: int,
    data: st.DataObject,
    dtype: torch.dtype,
    momentum: float | None,
    nbt: int | None,
    count: int,
    near: bool,
) -> None:
    def vec() -> torch.Tensor:
        return torch.tensor(data.draw(st.lists(values, min_size=c, max_size=c)), dtype=F64)

    mean, var, lo, hi = vec(), vec(), vec(), vec()
    mom = Moments(mean=mean, var=var, min=lo, max=hi, count=count)
    rm0, rv0 = vec(), vec()
    if near:  # what PyTorch would write, give or take a rounding: the decision's edge
        exp = running_update(rm0.to(dtype), rv0.to(dtype), nbt, mom, momentum)
        rm1 = exp.mean * (1 + data.draw(st.sampled_from([0.0, 1e-7, -3e-7, 1e-3])))
        rv1 = exp.var + data.draw(st.sampled_from([0.0, 1e-12, 2e-12, 1e-6]))
    else:
        rm1, rv1 = vec(), vec()
    call = fake_call(c, dtype, momentum, nbt, rm0, rv0, rm1, rv1)
    assert same(tail_update(call, mom), ref_running_update(call, mom))


@pytest.mark.parametrize("count", [0, 1, 2])
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_running_update_tiny_batches(count: int, momentum: float | None) -> None:
    c = 3
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    mom = Moments(mean=mean, var=mean.abs(), min=mean - 1, max=mean + 1, count=count)
    rm0, rv0 = torch.zeros(c), torch.ones(c)
    for nbt in (None, 0, 4):
        exp = running_update(rm0, rv0, nbt, mom, momentum)
        call = fake_call(c, torch.float32, momentum, nbt, rm0, rv0, exp.mean, exp.var)
        got, want = tail_update(call, mom), ref_running_update(call, mom)
        assert got is not None and same(got, want)
        bad = replace(call, running_var_after=call.running_var_after + 1)  # type: ignore[operator]
        assert same(tail_update(bad, mom), ref_running_update(bad, mom))


# --- the train/eval gap and the NaN-ignoring max, on any values ----------------------------
@settings(max_examples=300, deadline=None)
@given(c=st.integers(1, 40), data=st.data(), eps=st.sampled_from([1e-5, 0.0, 1e-3]))
def test_gap_matches_the_torch_formulas(c: int, data: st.DataObject, eps: float) -> None:
    def vec() -> torch.Tensor:
        return torch.tensor(data.draw(st.lists(values, min_size=c, max_size=c)), dtype=F64)

    mean, lo, hi, gamma, beta, rm = vec(), vec(), vec(), vec(), vec(), vec()
    var, rv = vec().abs(), vec().abs()
    mom = Moments(mean=mean, var=var, min=lo, max=hi, count=5)
    call = replace(fake_call(c, F64, 0.1, 0, rm, rv, rm, rv), eps=eps)
    want = ref_train_eval_gap(call, mom, gamma, beta, rm, rv)
    zeros = torch.zeros(c, dtype=F64)
    cmp = Comparison(zeros, torch.zeros(c, dtype=torch.int64), 0, 0, 0.0, (0,), 0.0, (0,))
    h, _ = layer_check._host_rows(mom, zeros, cmp, gamma, beta, rm, rv, None, eps)
    with np.errstate(all="ignore"):
        got = layer_check._train_eval_gap(eps, h)
        assert want is not None
        assert same(got.tolist(), want.tolist())
        assert same(layer_check._nanmax(got), ref_nanmax(want))


def test_random_gaps_many_channels() -> None:
    """Thousands of channels: torch's vectorized square root (not always NumPy's) is used."""
    g = torch.Generator().manual_seed(3)
    c = 5000
    mean, lo, hi = (torch.randn(c, dtype=F64, generator=g) for _ in range(3))
    var, rv = (torch.rand(c, dtype=F64, generator=g) * 10 for _ in range(2))
    gamma, beta, rm = (torch.randn(c, dtype=F64, generator=g) for _ in range(3))
    mom = Moments(mean=mean, var=var, min=lo, max=hi, count=9)
    call = fake_call(c, F64, 0.1, 0, rm, rv, rm, rv)
    want = ref_train_eval_gap(call, mom, gamma, beta, rm, rv)
    zeros = torch.zeros(c, dtype=F64)
    cmp = Comparison(zeros, torch.zeros(c, dtype=torch.int64), 0, 0, 0.0, (0,), 0.0, (0,))
    h, _ = layer_check._host_rows(mom, zeros, cmp, gamma, beta, rm, rv, None, call.eps)
    got = layer_check._train_eval_gap(call.eps, h)
    assert want is not None and got.tolist() == want.tolist()


@pytest.mark.parametrize(
    "vals",
    [[math.nan], [math.nan, math.nan], [math.nan, 1.0], [-math.inf, math.nan], [math.inf, 2.0]],
)
def test_nanmax_edges(vals: list[float]) -> None:
    t = torch.tensor(vals, dtype=F64)
    assert same(layer_check._nanmax(t.numpy()), ref_nanmax(t))


# --- the less travelled paths -----------------------------------------------------------------
def test_parameters_of_another_shape_take_as_f64s_path() -> None:
    net = bn_net()
    for train in (True, False):
        call = calls_of(net, torch.randn(4, 3, 9, 9), train)[0]
        assert call.weight is not None and call.bias is not None
        # as_f64 flattens; (the running update reads the buffers as they are: always (C,))
        odd = replace(
            call, weight=call.weight.detach().reshape(1, -1), bias=call.bias.to(torch.int64)
        )
        check_both(odd)


def test_host_rows_of_tensors_numpy_cannot_view() -> None:
    """Tensors that require grad (like a float64 parameter) go through torch's copy: same rows."""
    c = 7
    g = torch.Generator().manual_seed(5)
    vecs = [torch.randn(c, dtype=F64, generator=g) for _ in range(8)]
    mom = Moments(mean=vecs[0], var=vecs[1].abs(), min=vecs[2], max=vecs[3], count=4)
    counts = torch.randint(0, 9, (c,), generator=g)
    cmp = Comparison(vecs[4], counts, 0, 0, 0.0, (0,), 0.0, (0,))
    after = (vecs[6] * 2, vecs[7] * 2)
    eps = 1e-3
    plain, none = layer_check._host_rows(
        mom, vecs[5], cmp, vecs[6], vecs[7], vecs[4], vecs[5], after, eps
    )
    gamma = nn.Parameter(vecs[6].clone())
    other, sd = layer_check._host_rows(
        mom, vecs[5], cmp, gamma, vecs[7], vecs[4], vecs[5], after, eps
    )
    assert plain.dtype == other.dtype == np.float64 and plain.shape == (14, c)
    assert plain.tobytes() == other.tobytes()
    assert plain[layer_check._MISM].tolist() == [float(v) for v in counts.tolist()]
    # the torch path (a GPU's) takes the gap's roots before its one transfer: the same gap
    assert none is None and sd is not None and sd.shape == (2, c)
    assert same(sd.tolist(), torch.sqrt(torch.stack([mom.var, vecs[5]]) + eps).tolist())
    gap = layer_check._train_eval_gap(eps, plain.copy()).tolist()
    assert same(gap, layer_check._train_eval_gap(eps, other.copy(), sd).tolist())
    want = ref_train_eval_gap(
        replace(fake_call(c, F64, 0.1, 0, *vecs[4:8]), eps=eps),
        mom,
        vecs[6],
        vecs[7],
        vecs[4],
        vecs[5],
    )
    assert want is not None and same(gap, want.tolist())


def test_float64_parameters_are_not_handed_on_with_their_grad() -> None:
    net = bn_net(torch.float64)
    with torch.enable_grad():
        for call in calls_of(net, torch.randn(4, 3, 9, 9, dtype=F64), True):
            g, b, rm, rv, after = layer_check._params(call, 6, torch.device("cpu"))
            assert not any(t.requires_grad for t in (g, b))
            check_both(call)


def test_adopted_table_reads_like_one_built_from_columns() -> None:
    c = 5
    g = torch.Generator().manual_seed(2)
    src = torch.randn(11, c, dtype=F64, generator=g)  # more rows than columns: not read
    counts = torch.tensor([0.0, 3.0, 1.0, 0.0, 7.0], dtype=F64)
    rows = {"batch_mean": 0, "batch_var": 1, "max_abs_diff": 6, "tolerance": 7, "gamma": 4}
    t = ChannelTable.adopt(src, rows, counts)
    want = ChannelTable.from_columns(
        batch_mean=src[0],
        batch_var=src[1],
        running_mean=None,
        running_var=None,
        gamma=src[4],
        beta=None,
        max_abs_diff=src[6],
        mismatched=counts.to(torch.int64),
        tolerance=src[7],
        train_eval_gap=None,
    )
    m = t.tensor("mismatched")
    assert m is not None and m.dtype == torch.int64 and m.tolist() == [0, 3, 1, 0, 7]
    assert t[1].mismatched == 3 and isinstance(t[1].mismatched, int)
    assert t.column("mismatched") == (0, 3, 1, 0, 7)
    assert all(isinstance(v, int) for v in t.column("mismatched"))
    assert t.tensor("beta") is None and t.column("running_mean") == (None,) * c
    assert same(tuple(t), tuple(want)) and t == want
    fresh = ChannelTable.adopt(src, rows, counts)
    assert same(pickle.loads(pickle.dumps(fresh)), want)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [0.0, -0.0, 1.5, -2.0, 65504.0, 1e30, -1e300, math.nan, math.inf, -math.inf]
        ),
        max_size=12,
    ),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, F64]),
    st.sampled_from([(-1,), (1, -1)]),
)
def test_the_input_check_is_isfinite_all(
    values: list[float], dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """`nonfinite_input`'s test (greatest and least values finite) is torch.isfinite(t).all()."""
    t = torch.tensor(values, dtype=F64).to(dtype).reshape(shape)
    assert pipeline.all_finite(t) == bool(torch.isfinite(t).all())
