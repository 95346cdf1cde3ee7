"""Where a clean layer's greatest differences are: the regions the fused pass's partial results
point to, searched with `compare`'s own arithmetic and conventions (part of the verdict,
bn_diff/fused_verdict.py).

A slot's greatest |Δ| and relative |Δ| (`Partials.great`) say which regions (one sample's plane,
a whole channel, or one block) can hold the layer's greatest differences: those within the
channel's rounding margin of the greatest |Δ|, within 1e-9 of the greatest relative one, or where
a 0/0 hides the value. They are gathered and searched once, on the host in NumPy float64 (a
region is a few thousand values, where a torch call costs more in dispatch than in work), or on
the device where x and y live on a GPU (only each region's greatest values come back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from .fused import Partials
from .recompute import F64

MAX_TIES = 8
"""Regions that tie (within rounding) for the greatest difference and are searched exactly."""
BATCH_ELEMS = 1 << 18
"""At most this many elements are gathered at once to search regions (memory stays bounded)."""

_BIG = float(torch.finfo(F64).max)
_INF = float("inf")
Candidates = list[tuple[float, tuple[int, ...]]]
Vec = np.ndarray[tuple[int, ...], np.dtype[np.float64]]
Mask = np.ndarray[tuple[int, ...], np.dtype[np.bool_]]


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:  # type: ignore[type-arg]
    """A host array as a tensor on `device` (on CPU the same memory: never write `a` after).

    To a GPU through pinned memory, without waiting: a copy from pageable memory would wait for
    everything queued on the stream before it (the model's next layers included)."""
    t = torch.from_numpy(a)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True, slots=True)
class Ctx:
    xv: torch.Tensor
    yv: torch.Tensor
    shape: tuple[int, ...]
    host: tuple[Vec, Vec, Vec, Vec]
    """mean, sqrt(var + eps), gamma, beta on the host."""


def locate(
    ctx: Ctx,
    part: Partials,
    greatest: Vec,
    clean: Mask,
    margin: Vec,
    ch_max: Vec,
    best_abs: Candidates,
    best_rel: Candidates,
) -> None:
    """The greatest |Δ| and the greatest relative |Δ| of the clean channels, located on the
    regions that can hold them: for |Δ|, those within the channel margin of the greatest; for the
    relative one, those within 1e-9 of the greatest, or where a 0/0 hides the value. Regions of
    both kinds are gathered and searched once."""
    every = bool(clean.all())
    r_slot, q = greatest  # q: written here
    score = r_slot if every else np.where(clean, r_slot, -1.0)
    # a region whose residuals are all 0 has relative differences 0, even where 0/0 occurred
    q[r_slot == 0] = 0.0
    nan = np.isnan(q)
    unknown = nan if every else nan & clean
    known = np.where(nan if every else nan | ~clean, -1.0, q)
    rtop = float(known.max())
    if rtop == _INF:  # as np.nan_to_num has it: +inf counts as the largest float
        known[known == _INF] = _BIG
        rtop = _BIG
    # (-inf, from an empty region, needs no such care: it is never within 1e-9 of a top > 0)
    # the widest margin of the clean channels: another channel's (Inf or NaN where its values
    # are) would make every slot, or none, a tie
    widest = float((margin if every else np.where(clean, margin, 0.0)).max())
    top, n_unknown = float(score.max()), int(np.count_nonzero(unknown))
    n, length = int(ctx.xv.shape[0]), int(ctx.xv.shape[2])
    zero = (0,) * len(ctx.shape)
    abs_slots: list[tuple[int, int]] = []
    if top > 0:
        tie = top if top == _INF else top - widest
        hit = score >= tie
        abs_slots = _first(hit if every else hit & clean, part, n, length)
    elif top == 0:
        best_abs.append((0.0, zero))
    rel_slots: list[tuple[int, int]] = []
    if rtop > 0 or n_unknown:
        tie = rtop if rtop == _INF else rtop - rtop * 1e-9
        hits = unknown | (known >= tie)
        rel_slots = _first(hits, part, n, length, max(MAX_TIES, n_unknown))
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
    hit: Mask, part: Partials, n: int, length: int, limit: int = MAX_TIES
) -> list[tuple[int, int]]:
    """At most `limit` of the (slot, channel) pairs where `hit` (slots, C) holds, first in
    (sample, channel, position) order: the reference breaks ties by the first index.

    (slot, channel) order is that order unless a "split" slot is a segment of a plane (slot k is
    then segment k % segs of sample k // segs: several slots per sample)."""
    flat = hit.ravel().nonzero()[0]  # (slot, channel) order
    split = part.layout == "split"
    c = int(hit.shape[1])
    cand = [divmod(i, c) for i in (flat if split else flat[:limit]).tolist()]
    if split and len(cand) > 1:

        def key(sc: tuple[int, int]) -> tuple[int, int, int]:
            ns, ls = part.slot_region(sc[0], n, length)
            return (int(ns.start), sc[1], int(ls.start))

        cand.sort(key=key)
    return cand[:limit]


Found = tuple[float, tuple[int, ...]]


def _eval_slots(
    ctx: Ctx, part: Partials, slots: list[tuple[int, int]]
) -> list[tuple[Found, Found]]:
    """The greatest |Δ| and relative |Δ| of each (slot, channel) region of a clean channel, and
    where they are.

    Regions of one size ("rows": one sample's plane; "fold": all samples) are gathered and
    searched together, a bounded number of elements at a time; "split" ones one by one. The
    search runs on the host in NumPy float64 (`_diff`): a region is a few thousand values, where
    a torch call costs more in dispatch than in work."""
    n, length = int(ctx.xv.shape[0]), int(ctx.xv.shape[2])
    if part.layout == "split":
        groups = [[slot] for slot in slots]
    else:
        step = max(1, BATCH_ELEMS // (length if part.layout == "rows" else n * length))
        groups = [slots[k : k + step] for k in range(0, len(slots), step)]
    xs, ys = _source(ctx.xv, ctx.yv)
    spatial = ctx.shape[2:]
    out = []
    for group in groups:
        regions = [part.slot_region(slot, n, length) for slot, _ in group]
        chl = [ch for _, ch in group]
        ci = np.array(chl)
        if _search_on_device(xs):
            tops = _diff_on_device(xs, ys, regions, chl, np.stack([v[ci, None] for v in ctx.host]))
        else:
            cols = [v[ci, None] for v in ctx.host]
            x, y = _gather(xs, regions, chl), _gather(ys, regions, chl)
            tops = _diff(x, y, *cols)
        for j, ((ns, ls), ch) in enumerate(zip(regions, chl, strict=True)):
            n0, l0, width = int(ns.start), int(ls.start), int(ls.stop - ls.start)
            pair = []
            for values, where in tops:
                i, k = divmod(where[j], width)
                pair.append((values[j], (n0 + i, ch, *_unflat(l0 + k, spatial))))
            out.append((pair[0], pair[1]))
    return out


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)
"""Dtypes whose CPU tensors NumPy reads in place (bfloat16 has no NumPy dtype)."""


def _source(
    *ts: torch.Tensor,
) -> list[torch.Tensor | np.ndarray]:  # type: ignore[type-arg]
    """Where regions of each t are gathered from: a NumPy view of a CPU tensor of a dtype NumPy
    has (no copy, any strides), else the tensor itself (on CUDA, or bfloat16)."""
    out: list[torch.Tensor | np.ndarray] = []  # type: ignore[type-arg]
    for t in ts:
        if t.requires_grad:
            t = t.detach()
        out.append(t.numpy() if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES else t)
    return out


def _gather(
    src: torch.Tensor | np.ndarray,  # type: ignore[type-arg]
    regions: list[tuple[slice, slice]],
    chl: list[int],
) -> Vec:
    """(K, M) float64 host array: the K regions (samples, channel, plane segment) of `src`, each
    flattened in (sample, position) order; values converted exactly to float64. From a tensor,
    one gather and one transfer to the host."""
    if isinstance(src, torch.Tensor):
        parts = [src[ns, ch, ls] for (ns, ls), ch in zip(regions, chl, strict=True)]
        host: Vec = torch.stack(parts).to("cpu", F64).numpy()
        return host.reshape(len(chl), -1)
    (ns, ls), ch = regions[0], chl[0]
    out: Vec = np.empty((len(chl), ns.stop - ns.start, ls.stop - ls.start))
    for j, ((ns, ls), ch) in enumerate(zip(regions, chl, strict=True)):
        out[j] = src[ns, ch, ls]
    return out.reshape(len(chl), -1)


def _diff(x: Vec, y: Vec, mean: Vec, sd: Vec, gamma: Vec, beta: Vec) -> tuple[Top, Top]:
    """The greatest |y - e| and |y - e|/|e| of each of (K, M) rows of x and y (float64, converted
    exactly), each with its channel's (K, 1) float64 parameters (sd = sqrt(var + eps)), and the
    first index of it in the row, as `compare`'s argmax finds them: the same IEEE float64
    operations in the same order (the same bits), and its conventions (NaN is Inf, Inf the
    largest float).

    y is finite, as in every region searched here: a clean channel's residuals are all finite
    (y = ±Inf or NaN makes the pass's greatest residual Inf or NaN). `compare`'s "equal values
    agree" and "NaN agrees with NaN" then need no mask: y == e makes y - e exactly 0.
    NumPy's floating-point warnings: the caller's (np.errstate). x and y are overwritten."""
    e = np.subtract(x, mean, out=x)
    e /= sd
    e *= gamma
    e += beta
    d = np.subtract(y, e, out=y)
    np.abs(d, out=d)
    top_d = _top(d)
    if top_d is None:  # d as torch.nan_to_num(nan=inf) leaves it: the relative one is of that
        top_d = _top(np.nan_to_num(d, copy=False, nan=_INF), fixed=True)
    rel = np.abs(e, out=e)
    np.divide(d, rel, out=rel)
    rel[d == 0] = 0.0
    top_r = _top(rel)
    if top_r is None:
        top_r = _top(np.nan_to_num(rel, copy=False, nan=_INF), fixed=True)
    return top_d, top_r


Top = tuple[list[float], list[int]]


def _search_on_device(src: torch.Tensor | np.ndarray) -> bool:  # type: ignore[type-arg]
    """Whether regions of `src` (from `_source`) are searched where they are: off the CPU."""
    return isinstance(src, torch.Tensor) and src.device.type != "cpu"


def _diff_on_device(
    xs: torch.Tensor | np.ndarray,  # type: ignore[type-arg]
    ys: torch.Tensor | np.ndarray,  # type: ignore[type-arg]
    regions: list[tuple[slice, slice]],
    chl: list[int],
    cols: Vec,
) -> tuple[Top, Top]:
    """`_diff` where x and y live on a GPU: the regions are searched there with the same
    operations, in torch, and only each row's greatest values and their first indices come
    back, instead of the regions themselves (whole channels of a "fold" layer, up to 2 x 16 of
    them: megabytes per layer through PCIe). `cols`: (4, K, 1) mean, sd, gamma, beta of the rows'
    channels."""
    assert isinstance(xs, torch.Tensor) and isinstance(ys, torch.Tensor)
    x, y = (
        torch.stack([t[ns, ch, ls] for (ns, ls), ch in zip(regions, chl, strict=True)]).flatten(1)
        for t in (xs, ys)
    )
    mean, sd, gamma, beta = to_device(np.ascontiguousarray(cols), x.device).unbind(0)
    e = (x - mean) / sd  # x's own dtype, converted exactly by type promotion
    e = e * gamma + beta
    out = torch.empty((2, *x.shape), dtype=F64, device=x.device)
    d = torch.sub(y, e, out=out[0]).abs_().nan_to_num_(nan=_INF)
    rel = torch.div(d, e.abs(), out=out[1])
    rel.masked_fill_(d == 0, 0.0).nan_to_num_(nan=_INF)
    best = out.max(dim=2)  # the first index of the greatest, as `compare`'s argmax
    values, where = torch.stack([best.values, best.indices.to(F64)]).cpu().tolist()
    return (values[0], [int(w) for w in where[0]]), (values[1], [int(w) for w in where[1]])


@overload
def _top(v: Vec) -> Top | None: ...
@overload
def _top(v: Vec, fixed: Literal[True]) -> Top: ...


def _top(v: Vec, fixed: bool = False) -> Top | None:
    """(greatest, first index of it) of each row of v; None where a row holds NaN or Inf unless
    `fixed` (torch.nan_to_num is then to be applied first: its Inf, the largest float, may tie)."""
    where = v.argmax(1)  # the first NaN of a row that has one, else the first of the greatest
    values: list[float] = v.max(1).tolist()  # NaN where there is one
    if not fixed and not all(map(math.isfinite, values)):
        return None
    return values, where.tolist()


def _unflat(pos: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    out: list[int] = []
    for s in reversed(spatial):
        out.append(pos % s)
        pos //= s
    return tuple(reversed(out))


def pick(cands: Candidates, zero: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """Greatest value; among equal values the first index, as the reference's argmax gives."""
    if not cands:
        return 0.0, zero
    value = max(v for v, _ in cands)
    return max(value, 0.0), min(i for v, i in cands if v == value)
