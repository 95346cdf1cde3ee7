"""From the fused pass's partial results to statistics and a `Comparison` equal to the reference's.

Why the verdict is exact: every quantity of the pass is float64. A channel whose greatest |Δ|,
plus a margin of MARGIN_ULPS float64 epsilons of the magnitudes involved, stays below the
smallest difference it may have (atol + its rounding allowance) has no mismatched element under
any float64 evaluation order, the reference's included. Every other channel, and every channel
whose statistics are non-finite or were summed around a poor pivot, is re-done by the reference
path (`channel_moments`, `compare`) restricted to it: its counts are the reference's own.

The element of the greatest absolute and relative difference is located on the region (one
sample's plane, or one block) that holds it, with `compare`'s own arithmetic and conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compare import Comparison, compare, resolve, rounding_allowance
from .fused import Partials, runs
from .recompute import F64, Moments, channel_moments
from .results import Tolerance

MARGIN_ULPS = 4096.0
"""Float64 epsilons of the channel's magnitudes between its max |Δ| and its tolerance for the
channel to count as clean without an elementwise comparison (covers the different rounding of
the fused and the reference arithmetic, statistics included)."""
MAX_TIES = 8
"""Regions that tie (within rounding) for the greatest difference and are searched exactly."""
BATCH_ELEMS = 1 << 18
"""At most this many elements are gathered at once to search regions (memory stays bounded)."""

_EPS64 = float(torch.finfo(F64).eps)
Candidates = list[tuple[float, tuple[int, ...]]]


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


@dataclass(frozen=True, slots=True)
class _Ctx:
    xv: torch.Tensor
    yv: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float
    shape: tuple[int, ...]


def verdict(
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    part: Partials,
    stats: tuple[torch.Tensor, torch.Tensor],
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rm: torch.Tensor | None,
    rv: torch.Tensor | None,
    batch: bool,
    eps: float,
    tol: Tolerance,
) -> FusedResult:
    """`stats`: (mean - pivot, biased variance) per channel, as `Partials.stats` gives them."""
    n, c, length = (int(s) for s in xv.shape)
    m = n * length
    mean_p, var_b = stats
    mom = Moments(
        mean=part.pivot + mean_p,
        var=var_b,
        min=part.xmin,
        max=part.xmax,
        count=m,
    )
    r_slot = torch.maximum(part.hi[0], -part.lo[0])
    r_ch = r_slot.amax(0)
    finite = torch.stack([mom.mean, var_b, mom.min, mom.max]).isfinite().all(0)
    flagged = ~finite | part.poorly_pivoted(mean_p, var_b)
    mean_u, var_u = (mom.mean, var_b) if batch else (rm, rv)
    assert mean_u is not None and var_u is not None
    atol, rtol = resolve(tol, y.dtype)
    allow = rounding_allowance(tol, y.dtype, mom, mean_u, var_u, gamma, beta, eps)
    scale = (gamma / torch.sqrt(var_u + eps)).abs() * (3 * mom.absmax + 2 * mean_u.abs())
    margin = MARGIN_ULPS * _EPS64 * (scale + beta.abs() + r_ch + atol + allow)
    clean = ~flagged & torch.isfinite(margin) & (r_ch + margin < atol + allow)
    ch_max = torch.where(clean, r_ch, torch.zeros_like(r_ch))
    ch_cnt = torch.zeros(c, dtype=torch.int64, device=x.device)
    best_abs: Candidates = []
    best_rel: Candidates = []
    exact = torch.nonzero(~clean).flatten().tolist()
    if exact:
        mom, mean_u, var_u, allow = _exact(
            x,
            y,
            runs(exact),
            mom,
            mean_u,
            var_u,
            batch,
            gamma,
            beta,
            eps,
            tol,
            atol,
            rtol,
            ch_max,
            ch_cnt,
            best_abs,
            best_rel,
        )
    ctx = _Ctx(xv, yv, mean_u, var_u, gamma, beta, eps, tuple(int(s) for s in x.shape))
    if exact != list(range(c)):
        _locate(ctx, part, r_slot, clean, margin, ch_max, best_abs, best_rel)
    zero = (0,) * x.dim()
    abs_v, abs_i = _pick(best_abs, zero)
    rel_v, rel_i = _pick(best_rel, zero)
    cmp = Comparison(
        channel_max_abs=ch_max,
        channel_mismatched=ch_cnt,
        numel=x.numel(),
        mismatched=int(ch_cnt.sum().item()),
        max_abs_diff=abs_v,
        max_abs_index=abs_i,
        max_rel_diff=rel_v,
        max_rel_index=rel_i,
    )
    return FusedResult(mom, mean_u, var_u, allow, cmp, len(exact))


def _exact(
    x: torch.Tensor,
    y: torch.Tensor,
    runs: list[tuple[int, int]],
    mom: Moments,
    mean_u: torch.Tensor,
    var_u: torch.Tensor,
    batch: bool,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    tol: Tolerance,
    atol: float,
    rtol: float,
    ch_max: torch.Tensor,
    ch_cnt: torch.Tensor,
    best_abs: Candidates,
    best_rel: Candidates,
) -> tuple[Moments, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference path, statistics and comparison, on runs of channels [c0, c1).

    With batch statistics the comparison depends on them: they are then the reference's own,
    from the whole tensor, so that every element is classified bit for bit as the reference
    classifies it. With running statistics they are only reported, from the runs alone.
    """
    mean, var, lo, hi = (t.clone() for t in (mom.mean, mom.var, mom.min, mom.max))
    whole = channel_moments(x) if batch else None
    for c0, c1 in runs:
        ref = whole if whole is not None else channel_moments(x[:, c0:c1])
        s = slice(c0, c1) if whole is not None else slice(None)
        mean[c0:c1], var[c0:c1] = ref.mean[s], ref.var[s]
        lo[c0:c1], hi[c0:c1] = ref.min[s], ref.max[s]
    mom = Moments(mean=mean, var=var, min=lo, max=hi, count=mom.count)
    if batch:
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
        ch_max[cs] = cmp.channel_max_abs
        ch_cnt[cs] = cmp.channel_mismatched
        best_abs.append((cmp.max_abs_diff, _shift(cmp.max_abs_index, c0)))
        best_rel.append((cmp.max_rel_diff, _shift(cmp.max_rel_index, c0)))
    return mom, mean_u, var_u, allow


def _shift(idx: tuple[int, ...], c0: int) -> tuple[int, ...]:
    return (idx[0], idx[1] + c0, *idx[2:])


def _locate(
    ctx: _Ctx,
    part: Partials,
    r_slot: torch.Tensor,
    clean: torch.Tensor,
    margin: torch.Tensor,
    ch_max: torch.Tensor,
    best_abs: Candidates,
    best_rel: Candidates,
) -> None:
    """The greatest |Δ| and the greatest relative |Δ| of the clean channels, located on the
    regions that can hold them: for |Δ|, those within the channel margin of the greatest; for the
    relative one, those within 1e-9 of the greatest, or where a 0/0 hides the value. Regions of
    both kinds are gathered and searched once."""
    score = torch.where(clean, r_slot, -1.0)
    q = torch.maximum(part.hi[1], -part.lo[1])
    # a region whose residuals are all 0 has relative differences 0, even where 0/0 occurred
    q = torch.where(r_slot == 0, torch.zeros_like(q), q)
    unknown = q.isnan() & clean
    known = torch.where(clean, q.nan_to_num(nan=-1.0), torch.full_like(q, -1.0))
    top, widest, rtop, n_unknown = torch.stack(
        [score.max(), margin.max(), known.max(), unknown.sum().to(F64)]
    ).tolist()
    n, length = int(ctx.xv.shape[0]), int(ctx.xv.shape[2])
    zero = (0,) * len(ctx.shape)
    abs_slots: list[tuple[int, int]] = []
    if top > 0:
        tie = top if top == float("inf") else top - widest
        abs_slots = _first(torch.nonzero(score >= tie).tolist(), part, n, length)
    elif top == 0:
        best_abs.append((0.0, zero))
    rel_slots: list[tuple[int, int]] = []
    if rtop > 0 or n_unknown:
        tie = rtop if rtop == float("inf") else rtop - rtop * 1e-9
        hits = torch.nonzero(unknown | (known >= tie)).tolist()
        rel_slots = _first(hits, part, n, length, max(MAX_TIES, int(n_unknown)))
    elif rtop == 0:
        best_rel.append((0.0, zero))
    slots = list(dict.fromkeys(abs_slots + rel_slots))
    found = dict(zip(slots, _eval_slots(ctx, part, slots), strict=True))
    per_channel: dict[int, float] = {}
    for slot in abs_slots:
        value, idx = found[slot][0]
        ch = slot[1]
        per_channel[ch] = max(per_channel.get(ch, 0.0), value)
        best_abs.append((value, idx))
    for ch, value in per_channel.items():
        ch_max[ch] = value
    best_rel.extend(found[slot][1] for slot in rel_slots)


def _first(
    cand: list[list[int]], part: Partials, n: int, length: int, limit: int = MAX_TIES
) -> list[tuple[int, int]]:
    """At most `limit` (slot, channel) pairs, first in (sample, channel, position) order: the
    reference breaks ties by the first index."""

    def key(sc: list[int]) -> tuple[int, int, int]:
        ns, ls = part.slot_region(sc[0], n, length)
        return (int(ns.start), sc[1], int(ls.start))

    return [(s, ch) for s, ch in sorted(cand, key=key)[:limit]]


Found = tuple[float, tuple[int, ...]]


def _eval_slots(
    ctx: _Ctx, part: Partials, slots: list[tuple[int, int]]
) -> list[tuple[Found, Found]]:
    """The greatest |Δ| and relative |Δ| of each (slot, channel) region, and where they are.

    Regions of one size ("rows": one sample's plane; "fold": all samples) are gathered and
    searched together, a bounded number of elements at a time; "split" ones one by one."""
    n, length = int(ctx.xv.shape[0]), int(ctx.xv.shape[2])
    if part.layout == "split" or not slots:
        out = []
        for slot, ch in slots:
            ns, ls = part.slot_region(slot, n, length)
            out.append(_region_max(ctx, ns, slice(ch, ch + 1), ls))
        return out
    size = length if part.layout == "rows" else n * length
    step = max(1, BATCH_ELEMS // size)
    out = []
    for k in range(0, len(slots), step):
        part_slots = slots[k : k + step]
        chs = torch.tensor([ch for _, ch in part_slots], device=ctx.xv.device)
        if part.layout == "rows":
            rows = torch.tensor([s for s, _ in part_slots], device=ctx.xv.device)
            xr, yr = ctx.xv[rows, chs], ctx.yv[rows, chs]  # (K, L)
        else:
            xr = ctx.xv.index_select(1, chs).transpose(0, 1).reshape(len(part_slots), size)
            yr = ctx.yv.index_select(1, chs).transpose(0, 1).reshape(len(part_slots), size)
        d, rel = _diff(
            xr.to(F64),
            yr.to(F64),
            ctx.mean[chs],
            ctx.var[chs],
            ctx.gamma[chs],
            ctx.beta[chs],
            ctx.eps,
        )
        dv, dw = d.max(dim=1)
        rv, rw = rel.max(dim=1)
        flat = torch.stack([dv, dw.to(F64), rv, rw.to(F64)]).tolist()
        for j, (slot, ch) in enumerate(part_slots):
            pair = []
            for value, w in ((flat[0][j], int(flat[1][j])), (flat[2][j], int(flat[3][j]))):
                sample, pos = (slot, w) if part.layout == "rows" else divmod(w, length)
                pair.append((value, (sample, ch, *_unflat(pos, ctx.shape[2:]))))
            out.append((pair[0], pair[1]))
    return out


def _diff(
    x: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """|y - e| and |y - e|/|e| of (K, M) float64 rows, each with its channel's (K,) parameters,
    with `compare`'s arithmetic (same operations in the same order) and conventions."""
    e = (x - mean[:, None]) / torch.sqrt(var[:, None] + eps)
    e = e * gamma[:, None] + beta[:, None]
    zero = torch.zeros((), dtype=F64, device=x.device)
    d = (y - e).abs()
    d = torch.where((y == e) | (y.isnan() & e.isnan()), zero, d).nan_to_num(nan=float("inf"))
    rel = torch.where(d == 0, zero, d / e.abs()).nan_to_num(nan=float("inf"))
    return d, rel


def _unflat(pos: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    out: list[int] = []
    for s in reversed(spatial):
        out.append(pos % s)
        pos //= s
    return tuple(reversed(out))


def _region_max(ctx: _Ctx, ns: slice, cs: slice, ls: slice) -> tuple[Found, Found]:
    """Greatest |Δ| and relative |Δ| over samples ns, channels cs and plane segment ls, with
    `compare`'s arithmetic and conventions, and their indices into x."""
    xr = ctx.xv[ns, cs, ls].to(F64)
    yr = ctx.yv[ns, cs, ls].to(F64)
    e = (xr - _col(ctx.mean[cs])) / torch.sqrt(_col(ctx.var[cs]) + ctx.eps)
    e = e * _col(ctx.gamma[cs]) + _col(ctx.beta[cs])
    zero = torch.zeros((), dtype=F64, device=xr.device)
    d = (yr - e).abs()
    d = torch.where((yr == e) | (yr.isnan() & e.isnan()), zero, d).nan_to_num(nan=float("inf"))
    rel = torch.where(d == 0, zero, d / e.abs()).nan_to_num(nan=float("inf"))
    _, cb, lb = (int(s) for s in d.shape)
    out = []
    for t in (d, rel):
        flat = int(torch.argmax(t).item())
        value = float(t.reshape(-1)[flat].item())
        i, rest = divmod(flat, cb * lb)
        j, k = divmod(rest, lb)
        out.append(
            (
                value,
                (int(ns.start) + i, int(cs.start) + j, *_unflat(int(ls.start) + k, ctx.shape[2:])),
            )
        )
    return out[0], out[1]


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1)


def _pick(cands: Candidates, zero: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """Greatest value; among equal values the first index, as the reference's argmax gives."""
    if not cands:
        return 0.0, zero
    value = max(v for v, _ in cands)
    return max(value, 0.0), min(i for v, i in cands if v == value)
