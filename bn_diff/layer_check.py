"""One BN call, checked: recompute and compare (the fused pass, else the reference path), then
the per-layer tail on (C,) vectors (train/eval gap, running-statistics update, the channel
table) into a `LayerResult`.

`pipeline.run` calls `check_call` from each BN hook, so everything here runs inside the model's
forward, once per layer: its cost per layer is what issue 7 measures. After the pass, the tail's
arithmetic works on the host, in NumPy, on one float64 array of the layer's vectors (one copy on
CPU, one transfer from a GPU), with the torch formulas' operations in their order, so every
reported value keeps its bits.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import torch
from torch import nn

from .capture import BnCall
from .channel_table import ChannelTable
from .compare import Comparison, compare, dtype_name, resolve, rounding_allowance
from .fused import fused_check
from .oddities import empty_batch, empty_update
from .recompute import F64, Moments, Vec, as_f64, channel_moments, update_momentum
from .results import LayerInfo, LayerResult, RunningUpdate, Tolerance


def check_call(call: BnCall, tol: Tolerance) -> LayerResult:
    """Recompute one BN call in float64 and compare it with what PyTorch produced."""
    x, y = call.x, call.y
    if x.requires_grad or y.requires_grad:
        x, y = x.detach(), y.detach()
    c = int(x.shape[1]) if x.dim() >= 2 else 1
    if x.dim() < 2:
        x = x.reshape(1, -1)
        y = y.reshape(1, -1)
        c = int(x.shape[1])
    dev = x.device
    gamma, beta, rm, rv, after = _params(call, c, dev)
    atol, rtol = resolve(tol, y.dtype)
    fast = fused_check(x, y, gamma, beta, rm, rv, call.use_batch_stats, call.eps, tol)
    call.sample0 = None if fast is None else fast.sample0  # for health_batch
    if fast is not None:  # one fused float64 pass; the reference path where it matters
        mom, allow, cmp = fast.moments, fast.allowance, fast.comparison
    else:
        mom, allow, cmp = reference_check(
            x, y, gamma, beta, rm, rv, call.use_batch_stats, call.eps, tol
        )
    # the rest is arithmetic on (C,) vectors: on the host, in NumPy, one transfer on a GPU
    h, sd = _host_rows(mom, allow, cmp, gamma, beta, rm, rv, after, call.eps)
    gaps = update = None
    with np.errstate(all="ignore"):  # NaN and Inf follow the torch formulas' conventions
        if rm is not None and rv is not None and mom.count:
            gaps = _train_eval_gap(call.eps, h, sd)
        if call.updates_running_stats:
            update = _check_running_update(call, mom.count, h) if mom.count else empty_update(call)
        gap = None if gaps is None or gaps.size == 0 else _nanmax(gaps)
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
        shape=tuple(x.shape),
        weight_frozen=_frozen(call),
        num_batches_tracked=call.num_batches_tracked_before,
    )
    present = (rm is not None, rv is not None, call.weight is not None, call.bias is not None)
    names = _COLUMNS[(*present, gaps is not None)]
    return LayerResult(
        findings=empty_batch(call) if mom.count == 0 else (),
        info=info,
        # the table takes the rows as they are: ChannelStats objects are made when read
        channels=ChannelTable.adopt(_tensor(h[:_MISM]), names, _tensor(h[_MISM])),
        numel=cmp.numel,
        mismatched=cmp.mismatched,
        max_abs_diff=cmp.max_abs_diff,
        max_abs_index=cmp.max_abs_index,
        max_rel_diff=cmp.max_rel_diff,
        max_rel_index=cmp.max_rel_index,
        atol=atol,
        rtol=rtol,
        train_eval_gap=gap,
        running_update=update,
    )


def reference_check(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rm: torch.Tensor | None,
    rv: torch.Tensor | None,
    use_batch_stats: bool,
    eps: float,
    tol: Tolerance,
) -> tuple[Moments, torch.Tensor, Comparison]:
    """The reference path: float64 statistics, then the float64 comparison, chunk by chunk.

    What `fused_check` must agree with; used where the fused path does not apply.
    """
    mom = channel_moments(x)
    if use_batch_stats or rm is None or rv is None:
        mean, var = mom.mean, mom.var
    else:
        mean, var = rm, rv
    atol, rtol = resolve(tol, y.dtype)
    allow = rounding_allowance(tol, y.dtype, mom, mean, var, gamma, beta, eps)
    return mom, allow, compare(x, y, mean, var, gamma, beta, eps, atol, rtol, allow)


def _nanmax(v: Vec) -> float:
    """The greatest value that is not NaN (NaN when there is none); v not empty."""
    m = float(v.max())
    return m if m == m else float(np.fmax.reduce(v))  # max is NaN where v holds one


def _frozen(call: BnCall) -> bool:
    ps = [p for p in (call.weight, call.bias) if isinstance(p, nn.Parameter)]
    return bool(ps) and not any(p.requires_grad for p in ps)


def _params(
    call: BnCall, c: int, dev: torch.device
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor | None,
    tuple[torch.Tensor, torch.Tensor] | None,
]:
    """gamma, beta and the running mean and var before the call, as `as_f64` makes them
    ((C,) float64 on the activation's device), and where the call updates the running
    statistics, those after it (mean, var) as they are (`_host_rows` widens them)."""
    rm0, rv0 = call.running_mean_before, call.running_var_before
    raw = (call.weight, call.bias, rm0, rv0)
    got: list[torch.Tensor | None]
    if all(v is None or (v.shape == (c,) and v.device == dev) for v in raw):
        # as_f64 without its detach and reshape: one kind of torch op, cheaper in a hook
        got = [None if v is None else v.to(F64) for v in raw]
        if any(t is not None and t.requires_grad for t in got):  # a float64 parameter itself
            got = [None if t is None else t.detach() for t in got]
    else:
        got = [None if v is None else as_f64(v, c, 0.0, dev) for v in raw]
    g = got[0] if got[0] is not None else as_f64(None, c, 1.0, dev)
    b = got[1] if got[1] is not None else as_f64(None, c, 0.0, dev)
    rm1 = rv1 = None
    if call.updates_running_stats and rm0 is not None and rv0 is not None:
        rm1, rv1 = call.running_mean_after, call.running_var_after
    after = None if rm1 is None or rv1 is None else (rm1, rv1)  # made float64 with the rest
    return g, b, got[2], got[3], after


# Rows of the host array `_host_rows` makes. The first _MISM are the ChannelTable's float
# columns (a placeholder where one is absent; the gap's row is written after); then the counts.
_MEAN, _VAR, _RM, _RV, _GAMMA, _BETA, _CHMAX, _ALLOW, _GAP, _MISM, _LO, _HI, _RM1, _RV1 = range(14)
_ROWS = {
    "batch_mean": _MEAN,
    "batch_var": _VAR,
    "running_mean": _RM,
    "running_var": _RV,
    "gamma": _GAMMA,
    "beta": _BETA,
    "max_abs_diff": _CHMAX,
    "tolerance": _ALLOW,
    "train_eval_gap": _GAP,
}
_OPTIONAL = ("running_mean", "running_var", "gamma", "beta", "train_eval_gap")
_COLUMNS: dict[tuple[bool, ...], dict[str, int]] = {
    flags: {k: r for k, r in _ROWS.items() if k not in _OPTIONAL or flags[_OPTIONAL.index(k)]}
    for flags in product((False, True), repeat=len(_OPTIONAL))
}
"""The table's present columns and their rows, by (running_mean, running_var, gamma, beta,
train_eval_gap) present. Shared: ChannelTable never changes its `_rows`."""


def _host_rows(
    mom: Moments,
    allow: torch.Tensor,
    cmp: Comparison,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rm: torch.Tensor | None,
    rv: torch.Tensor | None,
    after: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
) -> tuple[Vec, Vec | None]:
    """Every (C,) vector the rest of `check_call` reads, as the rows (above) of one new float64
    host array: on CPU one NumPy copy of their views, elsewhere one transfer. The counts are
    exact in float64 below 2**53.

    Off the CPU also sqrt(var + eps) of the batch and running variances (the gap's), taken on
    the device as the torch formulas took them; on CPU None (torch's CPU root, on the host)."""
    mean = mom.mean
    ts = [
        mean,
        mom.var,
        mean if rm is None else rm,
        mean if rv is None else rv,
        gamma,
        beta,
        cmp.channel_max_abs,
        allow,
        mean,  # the gap's place
        cmp.channel_mismatched,
        mom.min,
        mom.max,
    ]
    if after is not None:
        ts += after
    try:
        return np.array([t.numpy() for t in ts], dtype=np.float64), None
    except (TypeError, RuntimeError):  # not on the CPU (or not plain tensors)
        pass
    ts = [t.detach().to(mean.device, F64).reshape(-1) for t in ts]
    n = len(ts)
    if rv is not None:  # the square roots of the gap where the old formulas took them
        ts += torch.sqrt(torch.stack([ts[_VAR], ts[_RV]]) + eps).unbind(0)
    both: Vec = torch.stack(ts).cpu().numpy()  # one transfer
    return both[:n], both[n:] if rv is not None else None


_tensor = torch.from_numpy


def _train_eval_gap(eps: float, h: Vec, sd: Vec | None = None) -> Vec:
    """Per channel, the greatest |y_other_mode - y| over the channel's inputs, written into the
    gap's row of `h` (`_host_rows`; the running statistics present).

    Both modes are affine in x per channel, so the gap is largest at the channel's min or max.
    `recompute.coefficients` of both modes (rows: batch, running), with torch's square roots:
    `sd` where given (sqrt(var + eps), `_host_rows`), else taken here.
    """
    if sd is None:
        sd = h[_VAR : _RV + 1 : 2] + eps
        _tensor(sd).sqrt_()  # torch's square root, in place
    a = h[_GAMMA] / sd
    b = h[_BETA] - a * h[_MEAN : _RM + 1 : 2]
    da, db = a[1] - a[0], b[1] - b[0]
    g = np.abs(da * h[_LO : _HI + 1] + db)
    gap: Vec = np.maximum(g[0], g[1], out=h[_GAP])
    return gap


def _check_running_update(call: BnCall, count: int, h: Vec) -> RunningUpdate | None:
    """The running statistics after the call against `recompute.running_update`'s: the same
    arithmetic, on the host, on (2, C) arrays (rows: mean, var)."""
    after = call.running_mean_after
    if len(h) <= _RV1 or after is None:
        return None
    r0, r1 = h[_RM : _RV + 1], h[_RM1 : _RV1 + 1]
    nbt, k = update_momentum(call.num_batches_tracked_before, call.momentum)
    unb = count / (count - 1) if count > 1 else 1.0
    # Moments.var_unbiased: var * (m / (m - 1)), NaN for m = 1; the mean times 1.0 is itself
    exp = (1 - k) * r0 + k * (h[_MEAN : _VAR + 1] * _unbias(count))  # recompute.running_update
    absmax = np.abs(h[_LO : _HI + 1]).max(axis=0)  # Moments.absmax
    # absmax**2 is absmax * absmax, correctly rounded (torch's pow with exponent 2 multiplies)
    scale = np.abs(r0) + np.array([k * absmax, k * unb * (absmax * absmax)]) + np.abs(exp)
    eps = _EPS.get(after.dtype)
    if eps is None:
        eps = (torch.finfo(after.dtype) if after.dtype.is_floating_point else _F32).eps
    d = np.abs(r1 - exp)
    dmax = d.max(axis=1).tolist() if d.size else [0.0, 0.0]
    # every value >= 0 (or NaN) when k >= 0: the sum is finite exactly when all of them are
    if k >= 0 and math.isfinite(float(scale.max(initial=0.0)) + dmax[0] + dmax[1]):
        # all finite: absdiff is |r1 - exp|, nan_to_num changes nothing, and d <= bound
        # everywhere exactly when d - bound <= 0 everywhere (the sign of a rounded difference)
        ok = d.size == 0 or float((d - (4 * eps * scale + 1e-12)).max()) <= 0.0
    else:  # NaN or Inf somewhere: compare.absdiff's and nan_to_num's conventions, spelled out
        d = _absdiff(r1, exp)
        ok = bool((d <= 4 * eps * _nan_to_num(scale, 0.0) + 1e-12).all())
        dmax = d.max(axis=1).tolist() if d.size else [0.0, 0.0]
    nbt_ok = nbt is None or nbt == call.num_batches_tracked_after
    change = np.abs(r1 - r0).max(axis=1).tolist() if d.size else [0.0, 0.0]
    return RunningUpdate(
        momentum_used=k,
        max_abs_diff_mean=dmax[0],
        max_abs_diff_var=dmax[1],
        num_batches_tracked_ok=nbt_ok,
        ok=ok and nbt_ok,
        largest_mean_change=change[0],
        largest_var_change=change[1],
    )


_F32 = torch.finfo(torch.float32)
_EPS = {t: torch.finfo(t).eps for t in (torch.float16, torch.bfloat16, torch.float32, F64)}
"""torch.finfo(dtype).eps of the usual buffer dtypes."""


def _unbias(count: int) -> Vec:
    """(2, 1): 1 for the mean, m/(m-1) for the variance (NaN for m <= 1)."""
    f: Vec = np.array([[1.0], [count / (count - 1) if count > 1 else math.nan]])
    return f


def _absdiff(a: Vec, e: Vec) -> Vec:
    """`compare.absdiff` on float64 host arrays: 0 where equal or both NaN, inf where only one
    is NaN, and (torch's nan_to_num) the greatest float64 where the difference is infinite."""
    d = np.abs(a - e)
    d[(a == e) | (np.isnan(a) & np.isnan(e))] = 0.0
    return _nan_to_num(d, math.inf)


def _nan_to_num(v: Vec, nan: float) -> Vec:
    """torch's `v.nan_to_num(nan=nan)`: +-inf also become the greatest and least float64."""
    out: Vec = np.nan_to_num(v, nan=nan, posinf=_F64MAX, neginf=-_F64MAX)
    return out


_F64MAX = float(np.finfo(np.float64).max)


__all__ = ["check_call", "reference_check"]
