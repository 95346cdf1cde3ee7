"""From the fused pass's partial results to statistics and a `Comparison` equal to the reference's.

Why the verdict is exact: every quantity of the pass is float64. A channel whose greatest |Δ|,
plus a margin of MARGIN_ULPS float64 epsilons of the magnitudes involved, stays below the
smallest difference it may have (atol + its rounding allowance) has no mismatched element under
any float64 evaluation order, the reference's included. Every other channel, and every channel
whose statistics are non-finite or were summed around a poor pivot, is re-done by the reference
path (`channel_moments`, `compare`) restricted to it: its counts are the reference's own.

The element of the greatest absolute and relative difference is located on the region (one
sample's plane, or one block) that holds it, with `compare`'s own arithmetic and conventions
(bn_diff/fused_locate.py).

The per-channel arithmetic here works on (C,) and (slots, C) vectors: as torch calls it cost more
in dispatch than the compiled pass costs in work, so the partial results come to the host once, as
one float64 NumPy array (`Host`), and the small-vector arithmetic runs there. Every elementwise
operation is IEEE float64 in both libraries, written in the order the torch code had, so the
values are the same to the bit; sums over slots stay torch's (`Tensor.sum`). What the caller gets
back (statistics, allowance, comparison) is torch tensors on x's device, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import fused_locate
from .compare import Comparison, allowance, compare, resolve, rounding_allowance
from .fused import PIVOT_RATIO, BnArgs, Partials, runs
from .fused_locate import Candidates, Ctx, Mask, Vec, pick, to_device
from .recompute import F64, Moments, channel_moments
from .results import Tolerance

MARGIN_ULPS = 4096.0
"""Float64 epsilons of the channel's magnitudes between its max |Δ| and its tolerance for the
channel to count as clean without an elementwise comparison (covers the different rounding of
the fused and the reference arithmetic, statistics included)."""

_EPS64 = float(torch.finfo(F64).eps)


@dataclass(frozen=True, slots=True)
class Host:
    """A pass's partial results and the layer's float64 parameters on the host, as NumPy arrays
    (on CPU views of the tensors themselves; from a GPU views of one array, one transfer), with
    the statistics derived from them. Read-only: nothing may write into them."""

    mean_p: Vec
    """(C,): mean - pivot, from m values per channel."""
    var: Vec
    """(C,): biased variance."""
    poor: Mask
    """(C,): finite statistics summed around a pivot more than sqrt(PIVOT_RATIO) standard
    deviations from the mean, where the sums lose digits to cancellation."""
    pivot: Vec
    xmin: Vec
    xmax: Vec
    gamma: Vec
    beta: Vec
    rm: Vec | None
    """(C,): the running mean, where the output was normalized with the running statistics."""
    sd: Vec | None
    """(C,): then sqrt(running_var + eps), by torch.sqrt (as `compare` has it: on CPU it may differ
    from the correctly rounded root in the last bit)."""
    great: Vec
    """(2, slots, C): as `Partials.great` (read-only: on CPU a view of it)."""
    batch_sd: Vec | None = None
    """(C,): sqrt(var + eps) of the batch variance, by torch.sqrt on the pass's device (as
    `compare` takes it), where the output was normalized with the batch statistics."""
    sample0: tuple[Vec, Vec, Vec, Vec] | None = None
    """(C,) mean, biased variance, min and max of sample 0's values, from `Partials.sample0`;
    None where the pass had no such sums, or where they are not as good as a two-pass
    recompute's (a non-finite value, or a channel whose sample 0 lies far from the pivot)."""

    @classmethod
    def of(
        cls,
        part: Partials,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        running: tuple[torch.Tensor, torch.Tensor] | None,
        m: int,
        batch_eps: float | None = None,
    ) -> Host:
        """`running`: (running_mean, sqrt(running_var + eps)) where the output was normalized
        with the running statistics; `batch_eps`: eps where it was normalized with the batch's.
        NumPy's floating-point warnings: the caller's (np.errstate)."""
        c = int(part.pivot.shape[0])
        # one slot: its sums are the channel's (a sum is never -0.0, so summing one row is exact)
        t1, t2 = (part.s1[0], part.s2[0]) if len(part.s1) == 1 else (part.s1.sum(0), part.s2.sum(0))
        vecs = [t1, t2, part.pivot, part.xmin, part.xmax, gamma, beta]
        vecs += [] if running is None else list(running)
        first = part.sample0 if batch_eps is not None else None  # for batch statistics only
        if first is not None:
            vecs += [first.s1, first.s2, first.xmin, first.xmax]
        batch_sd: Vec | None = None
        if all(t.device.type == "cpu" and t.dtype == F64 for t in (*vecs, part.great)):
            # read in place: views of the pass's results (a redo makes a new Host before it
            # splices into them) and of the layer's float64 parameters, which nothing writes
            s1, s2, pivot, xmin, xmax, g, b, *rmv = (t.detach().numpy() for t in vecs)
            sums0, rmv = (rmv[-4:], rmv[:-4]) if first is not None else ([], rmv)
            great = part.great.numpy()
            for v in (g, b, great):  # a float64 model's gamma and beta are its own parameters
                v.setflags(write=False)
            mean_p, var = _statistics(s1, s2, m)
            if batch_eps is not None:
                batch_sd = torch.sqrt(torch.from_numpy(var + batch_eps)).numpy()
        else:  # one transfer from the device, the batch's square root taken there first
            if batch_eps is not None:  # the same operations as _statistics', on the device
                # divided by a device tensor: by a Python number, CUDA multiplies by its
                # reciprocal instead (one bit off in about half the quotients)
                md = torch.full((), m, dtype=F64, device=t1.device)
                mean_t = t1 / md
                var_t = torch.clamp_min(t2 - t1 * mean_t, 0.0) / md
                vecs.append(torch.sqrt(var_t + batch_eps))
            k = len(vecs) * c
            flat = torch.cat([*vecs, part.great.reshape(-1)]).cpu().numpy()
            s1, s2, pivot, xmin, xmax, g, b, *rmv = flat[:k].reshape(len(vecs), c)
            if batch_eps is not None:
                batch_sd = rmv.pop()
            sums0, rmv = (rmv[-4:], rmv[:-4]) if first is not None else ([], rmv)
            great = flat[k:].reshape(part.great.shape)
            mean_p, var = _statistics(s1, s2, m)
        poor = np.isfinite(mean_p * var) & (mean_p * mean_p > PIVOT_RATIO * var)
        return cls(
            mean_p=mean_p,
            var=var,
            poor=poor,
            pivot=pivot,
            xmin=xmin,
            xmax=xmax,
            gamma=g,
            beta=b,
            rm=rmv[0] if rmv else None,
            sd=rmv[1] if rmv else None,
            great=great,
            batch_sd=batch_sd,
            sample0=None if first is None else _sample0(sums0, pivot, first.count),
        )


def _sample0(sums: list[Vec], pivot: Vec, count: int) -> tuple[Vec, Vec, Vec, Vec] | None:
    """Sample 0's (mean, var, min, max) from its sums around the pivot, where they are as good
    as `channel_moments`': every value finite, and every channel's sample-0 mean within
    sqrt(PIVOT_RATIO) standard deviations of the pivot (the batch's test for poor pivots)."""
    s1, s2, lo, hi = sums
    mean_p, var = _statistics(s1, s2, count)
    if not (np.isfinite(mean_p).all() and np.isfinite(var).all()):
        return None
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    if (mean_p * mean_p > PIVOT_RATIO * var).any():
        return None
    return pivot + mean_p, var, lo, hi


def _statistics(s1: Vec, s2: Vec, m: int) -> tuple[Vec, Vec]:
    """(mean - pivot, biased variance) from Σ(x - p) and Σ(x - p)² over m values."""
    mean_p = s1 / m
    d = s2 - s1 * mean_p
    return mean_p, np.where(d < 0.0, 0.0, d) / m  # torch.clamp_min's: NaN and -0.0 stay


@dataclass(frozen=True, slots=True)
class FusedResult:
    """What `check_call` needs: statistics, the tolerance in force, and the comparison."""

    moments: Moments
    mean: torch.Tensor
    """(C,) float64: the mean the output was normalized with (batch or running)."""
    var: torch.Tensor
    allowance: torch.Tensor
    comparison: Comparison
    exact_channels: int
    """How many channels went through the reference path."""
    sample0: Moments | None = None
    """Sample 0's own moments (`Host.sample0`), on x's device; None where the pass had none."""


def verdict(
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    part: Partials,
    host: Host,
    bn: BnArgs,
    tol: Tolerance,
) -> FusedResult:
    """`host`: `Host.of(part, ...)`, with the running statistics unless `bn.batch`. NumPy's
    floating-point warnings: the caller's (np.errstate)."""
    n, c, length = xv.shape
    dev = x.device
    mean, var_b = host.pivot + host.mean_p, host.var
    mv, vv = to_device(mean, dev), to_device(var_b, dev)
    mom = Moments(mean=mv, var=vv, min=part.xmin, max=part.xmax, count=n * length)
    mean_u: torch.Tensor | None
    var_u: torch.Tensor | None
    hmean: Vec | None
    sd: Vec | None
    if bn.batch:
        # torch's root on x's device, as `compare` takes it (a CPU root may differ from a GPU
        # one in the last bit): Host.of's, or taken here if it was not asked for
        mean_u, var_u, hmean, sd = mom.mean, mom.var, mean, host.batch_sd
        if sd is None:
            sd = torch.sqrt(var_u + bn.eps).cpu().numpy()
    else:
        mean_u, var_u, hmean, sd = bn.rm, bn.rv, host.rm, host.sd
    assert mean_u is not None and var_u is not None and hmean is not None and sd is not None
    # (2, slots, C): the greatest |Δ| and relative |Δ| (NaN where 0/0 occurred) of each slot
    greatest = host.great.copy()  # fused_locate.locate writes into it
    r_slot = greatest[0]
    r_ch = r_slot.max(0)
    finite = np.isfinite(mean) & np.isfinite(var_b)
    finite &= np.isfinite(host.xmin) & np.isfinite(host.xmax)
    flagged = ~finite | host.poor
    atol, rtol = resolve(tol, y.dtype)
    absmax = np.maximum(np.abs(host.xmin), np.abs(host.xmax))  # Moments.absmax
    hallow: Vec
    if tol.explicit:
        hallow = np.zeros(c)
    else:
        hallow = allowance(tol, y.dtype, absmax, hmean, sd, host.gamma, host.beta)
    allow = to_device(hallow, dev)  # = rounding_allowance(...)
    scale = np.abs(host.gamma / sd) * (3 * absmax + 2 * np.abs(hmean))
    margin = MARGIN_ULPS * _EPS64 * (scale + np.abs(host.beta) + r_ch + atol + hallow)
    clean = ~flagged & np.isfinite(margin) & (r_ch + margin < atol + hallow)
    # + 0.0: no -0.0 (torch.maximum and np.maximum sign a zero differently; |Δ| is never -0.0)
    every = bool(clean.all())
    ch_max = (r_ch if every else np.where(clean, r_ch, 0.0)) + 0.0
    ch_cnt = np.zeros(c, dtype=np.int64)
    best_abs: Candidates = []
    best_rel: Candidates = []
    exact: list[int] = [] if every else np.flatnonzero(~clean).tolist()
    if exact:
        mom, mean_u, var_u, allow = _exact(
            x,
            y,
            runs(exact),
            mom,
            mean_u,
            var_u,
            bn,
            tol,
            atol,
            rtol,
            ch_max,
            ch_cnt,
            best_abs,
            best_rel,
        )
    if len(exact) != c:  # only clean channels are located: `_exact` left their values as they were
        hosted = (hmean, sd, host.gamma, host.beta)
        ctx = Ctx(xv, yv, tuple(x.shape), hosted)
        fused_locate.locate(ctx, part, greatest, clean, margin, ch_max, best_abs, best_rel)
    zero = (0,) * x.dim()
    abs_v, abs_i = pick(best_abs, zero)
    rel_v, rel_i = pick(best_rel, zero)
    cmp = Comparison(
        channel_max_abs=to_device(ch_max, dev),
        channel_mismatched=to_device(ch_cnt, dev),
        numel=x.numel(),
        mismatched=int(ch_cnt.sum()) if exact else 0,
        max_abs_diff=abs_v,
        max_abs_index=abs_i,
        max_rel_diff=rel_v,
        max_rel_index=rel_i,
    )
    first = None
    if host.sample0 is not None:
        m0, v0, lo0, hi0 = (to_device(v, dev) for v in host.sample0)
        first = Moments(mean=m0, var=v0, min=lo0, max=hi0, count=int(length))
    return FusedResult(mom, mean_u, var_u, allow, cmp, len(exact), first)


def _exact(
    x: torch.Tensor,
    y: torch.Tensor,
    runs: list[tuple[int, int]],
    mom: Moments,
    mean_u: torch.Tensor,
    var_u: torch.Tensor,
    bn: BnArgs,
    tol: Tolerance,
    atol: float,
    rtol: float,
    ch_max: Vec,
    ch_cnt: np.ndarray,  # type: ignore[type-arg]
    best_abs: Candidates,
    best_rel: Candidates,
) -> tuple[Moments, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference path, statistics and comparison, on runs of channels [c0, c1).

    With batch statistics the comparison depends on them: they are then the reference's own,
    from the whole tensor, so that every element is classified bit for bit as the reference
    classifies it. With running statistics they are only reported, from the runs alone.
    """
    gamma, beta, eps = bn.gamma, bn.beta, bn.eps
    mean, var, lo, hi = (t.clone() for t in (mom.mean, mom.var, mom.min, mom.max))
    whole = channel_moments(x) if bn.batch else None
    for c0, c1 in runs:
        ref = whole if whole is not None else channel_moments(x[:, c0:c1])
        s = slice(c0, c1) if whole is not None else slice(None)
        mean[c0:c1], var[c0:c1] = ref.mean[s], ref.var[s]
        lo[c0:c1], hi[c0:c1] = ref.min[s], ref.max[s]
    mom = Moments(mean=mean, var=var, min=lo, max=hi, count=mom.count)
    if bn.batch:
        mean_u, var_u = mean, var
    allow = rounding_allowance(tol, y.dtype, mom, mean_u, var_u, gamma, beta, eps)
    for c0, c1 in runs:
        cs = slice(c0, c1)
        cmp = compare(
            x[:, cs],
            y[:, cs],
            mean_u[cs],
            var_u[cs],
            gamma[cs],
            beta[cs],
            eps,
            atol,
            rtol,
            allow[cs],
        )
        ch_max[cs] = cmp.channel_max_abs.cpu().numpy()
        ch_cnt[cs] = cmp.channel_mismatched.cpu().numpy()
        best_abs.append((cmp.max_abs_diff, _shift(cmp.max_abs_index, c0)))
        best_rel.append((cmp.max_rel_diff, _shift(cmp.max_rel_index, c0)))
    return mom, mean_u, var_u, allow


def _shift(idx: tuple[int, ...], c0: int) -> tuple[int, ...]:
    return (idx[0], idx[1] + c0, *idx[2:])
