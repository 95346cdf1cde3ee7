"""Recompute and compare one BN call in a single fused float64 pass over cache-sized blocks.

The reference path (`recompute.channel_moments`, then `compare.compare`) walks x twice and makes
several float64 temporaries per element. This module gives the same answer with one walk: each
block of at most `block_elems(device)` elements of x and y is converted to float64 once, into a
reused scratch buffer, and gives per slot (one sample's plane when planes are large, else all
samples of a channel, or one block of a huge plane) and channel
  Σ(x - p), Σ(x - p)², min x, max x        (the batch statistics; p a pivot per channel)
  max |y - e| and max |(y - e)/e|          (e = a·(x - p) + b', the by-hand output)
All of it is float64: a channel's max |Δ| is the reference's up to float64 rounding.
`fused_verdict` turns these partial results into the statistics and the `Comparison`, and sends
the channels where rounding could matter (near their tolerance, non-finite) through the
reference path; channels whose pivot was poor are summed again around their mean first.

The same partial results can come from one compiled loop per layer (bn_diff/kernels.py), for
layers whose search regions fit a block; a layer keeps one way through its redo passes.

Blocks are channel-major: a channel's statistics are complete before its comparison starts, so
in train mode (statistics from the batch) x is converted once per block, as in eval mode,
whenever a channel fits in one block. Only bounded scratch is allocated, never a float64 twin:
three float64 buffers of `block_elems` elements per thread and device, and per-slot partial
results (a few float64 per (sample, channel) plane of >= ROW_MIN values, else per channel).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import kernels
from .fused_parts import (
    Block,
    BnArgs,
    Partials,
    SampleSums,
    blocks_per_channel,
    plan,
    region,
)
from .recompute import F64
from .results import Tolerance

__all__ = [
    "Block",
    "BnArgs",
    "Partials",
    "SampleSums",
    "block_elems",
    "blocks_per_channel",
    "fused_check",
    "fused_pass",
    "plan",
    "region",
    "release_scratch",
    "runs",
    "view3",
]

if TYPE_CHECKING:
    from .fused_verdict import FusedResult

CPU_BLOCK = 1 << 17
"""Elements per block and CPU thread (up to 4 threads): per thread, three float64 buffers of
1 MiB stay near the core's caches, and each torch call gets enough work to amortise its dispatch
and its fork/join across threads (measured on ResNet-50: 2^17 and 2^18 per thread are equally
fast, smaller blocks pay the per-call overhead, larger ones the cache misses)."""
CUDA_BLOCK = 1 << 23
"""Elements per block on a GPU (three float64 buffers of 64 MiB, allocated per call through the
CUDA caching allocator): few blocks per layer, since kernel launches dominate there."""
ROW_MIN = 128
"""Planes of at least this many values keep partial results per (sample, channel) row: one
reduction call per block, and a small region to search for the greatest difference. Smaller
planes fold the samples of a block together, so partial results never outgrow ~1/16 of x."""

PIVOT_RATIO = 16.0
"""A channel's sums are redone around its mean when (mean - pivot)² > PIVOT_RATIO·var: beyond
that, Σ(x - p)² - (Σ(x - p))²/m would lose more than a few float64 digits to cancellation."""

MAX_REDO_SPANS = 4
"""Poorly pivoted channels are summed again span by span (runs of neighbours) up to this many
spans; beyond, the whole layer gets one more pass (bounded work: at most two passes)."""

_local = threading.local()
_BN_OUT = torch.ops.aten.native_batch_norm.out


def block_elems(device: torch.device) -> int:
    """Elements per block for tensors on `device` (the working set is 3x this, in float64)."""
    if device.type == "cpu":
        return CPU_BLOCK * min(4, max(1, torch.get_num_threads()))
    return CUDA_BLOCK


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A float64 buffer of `numel` elements: on CPU reused across calls (per thread), elsewhere
    fresh (the CUDA caching allocator makes that cheap, and keeps nothing of ours after a run)."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=F64, device=device)
    bufs: dict[torch.device, torch.Tensor] | None = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = {}
        _local.bufs = bufs
    t = bufs.get(device)
    if t is None or t.numel() < numel:
        t = torch.empty(numel, dtype=F64, device=device)
        bufs[device] = t
    return t[:numel]


def release_scratch() -> None:
    """Free this thread's scratch buffers (bounded, but a caller may want the memory back)."""
    _local.bufs = {}


def view3(t: torch.Tensor) -> torch.Tensor | None:
    """t as (N, C, L) without copying, or None when its strides do not allow that."""
    n, c = int(t.shape[0]), int(t.shape[1])
    length = 1
    for s in t.shape[2:]:
        length *= int(s)
    try:
        return t.view(n, c, length)
    except RuntimeError:
        return None


def fused_pass(
    xv: torch.Tensor,
    yv: torch.Tensor,
    bn: BnArgs,
    target: int,
    pivot: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> Partials:
    """One walk over x and y, as (N, C, L) views (and a pivot, when the caller knows a better one
    than a sample of x); `use_kernel` None: as bn_diff/kernels.py's policy says."""
    n, c, length = (int(s) for s in xv.shape)
    dev = xv.device
    m = n * length
    pivot = _pivot(xv) if pivot is None else pivot
    if kernels.wanted(xv, yv) if use_kernel is None else use_kernel:
        done = _compiled_pass(xv, yv, bn, target, pivot)
        if done is not None:
            return done
    p3 = pivot.view(1, -1, 1)
    per, groups = plan(n, c, length, target)
    mode = "rows" if per == 1 and length >= ROW_MIN else ("fold1" if length == 1 else "fold")
    buf = _scratch(3 * min(target, n * c * length), dev)
    zeros = torch.zeros(c, dtype=F64, device=dev)
    ones = torch.ones(c, dtype=F64, device=dev)
    nothing = torch.empty(0, dtype=F64, device=dev)
    nothing2 = torch.empty(0, dtype=F64, device=dev)
    coef_all = None
    if not bn.batch:
        assert bn.rm is not None and bn.rv is not None
        coef_all = bn.neg_e(bn.rm - pivot, bn.rv)

    s1s: list[torch.Tensor] = []
    s2s: list[torch.Tensor] = []
    greats: list[torch.Tensor] = []
    xmaxs: list[torch.Tensor] = []
    xmins: list[torch.Tensor] = []
    firsts: list[tuple[torch.Tensor, ...]] = []  # "fold": sample 0's sums and extremes per block
    for group in groups:
        cs = group[0].cs
        for blk in group:
            b3 = _load_x(xv, buf, p3, blk)
            s1, s2 = _sums(b3, mode)
            s1s.append(s1)
            s2s.append(s2)
            if mode == "fold" and per == 1 and bn.batch and n > 1:  # for health_batch
                firsts.append(_first_sums(b3[0][0], xv[0, blk.cs]))
        if coef_all is None:  # train: this group's statistics, then its coefficients
            gs1 = s1s[-1].sum(0) if len(group) == 1 else torch.cat(s1s[-len(group) :]).sum(0)
            gs2 = s2s[-1].sum(0) if len(group) == 1 else torch.cat(s2s[-len(group) :]).sum(0)
            mean_p = gs1 / m
            var = torch.clamp_min(gs2 - gs1 * mean_p, 0.0) / m
            coef = bn.neg_e(mean_p, var, cs)
        else:
            coef = (coef_all[0][cs], coef_all[1][cs])
        for blk in group:
            b3 = _load_x(xv, buf, p3, blk) if len(group) > 1 else _bufs(buf, blk)
            # -e = -a·(x - p) - b' (batch norm in eval form: mean 0, var 1, eps 0), written into
            # the scratch: a fresh buffer per block, between long-lived small tensors, would
            # fragment the heap by a block each time
            _BN_OUT(
                b3[0],
                coef[0],
                coef[1],
                zeros[cs],
                ones[cs],
                False,
                0.0,
                0.0,
                out=b3[2],
                save_mean=nothing.resize_(0),  # zero-sized: CUDA resizes it without a warning
                save_invstd=nothing2.resize_(0),
            )
            r = b3[1]
            r.copy_(yv[blk.ns, blk.cs, blk.ls])
            r.add_(b3[2])  # y - e
            torch.div(r, b3[2], out=b3[2])  # (y - e)/(-e)
            rq = b3[1:].abs_()
            greats.append(_extremes(rq, mode, torch.amax))
            xb = xv[blk.ns, blk.cs, blk.ls]
            xmaxs.append(_extremes(xb, mode, torch.amax))
            xmins.append(_extremes(xb, mode, torch.amin))

    def slots(parts: list[torch.Tensor]) -> torch.Tensor:
        """(..., slots, C) from one (..., slots, cb) piece per block, in block order."""
        if per == 1:
            return torch.cat(parts, -1)
        # one (..., 1, 1) piece per block, channel-major
        cat = torch.cat(parts, -2)
        return cat.reshape(*cat.shape[:-2], c, per).transpose(-1, -2)

    s1_all, s2_all = slots(s1s), slots(s2s)
    xmin_all, xmax_all = slots(xmins), slots(xmaxs)
    first: SampleSums | None = None
    if mode == "rows" and bn.batch and n > 1:  # slot 0 is sample 0
        first = SampleSums(s1_all[0], s2_all[0], xmin_all[0].to(F64), xmax_all[0].to(F64), length)
    elif firsts:
        f1, f2, fmin, fmax = (torch.cat(parts) for parts in zip(*firsts, strict=True))
        first = SampleSums(f1, f2, fmin.to(F64), fmax.to(F64), length)
    return Partials(
        layout="split" if per > 1 else ("rows" if mode == "rows" else "fold"),
        pivot=pivot,
        s1=s1_all,
        s2=s2_all,
        great=slots(greats),
        xmin=xmin_all.amin(0).to(F64),
        xmax=xmax_all.amax(0).to(F64),
        target=target,
        sample0=first,
    )


def _first_sums(xp0: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sample 0's Σ(x - p), Σ(x - p)², min x, max x per channel of a "fold" block: xp0 (cb, L)
    is x - p in the scratch, x0 (cb, L) the block's sample 0 in x's dtype."""
    s2 = torch.linalg.vector_norm(xp0, dim=1).square_()
    return xp0.sum(1), s2, x0.amin(1), x0.amax(1)


def _compiled_pass(
    xv: torch.Tensor, yv: torch.Tensor, bn: BnArgs, target: int, pivot: torch.Tensor
) -> Partials | None:
    """`fused_pass` by the compiled kernels (bn_diff/kernels.py), in their "rows" (planes of at
    least kernels.MIN_PLANE values) or "fold" layout: one read of x and y in eval mode, and in
    train mode in "fold" (each channel's statistics, then its residuals while it is in the
    cache); in train mode in "rows", a statistics read of x first. None when they fail."""
    p = pivot.view(-1, 1)
    lay = kernels.layout(int(xv.shape[2]))
    if bn.batch and lay == "fold":  # statistics and residuals in one call
        g, b = bn.gamma.view(-1, 1), bn.beta.view(-1, 1)
        eps = torch.full((1, 1), bn.eps, dtype=F64, device=xv.device)
        out = kernels.call(lay, "train", xv, yv, p, g, b, eps)
    elif bn.batch:  # "rows": the statistics, then the residuals with their coefficients
        sums = kernels.call(lay, "sums", xv, p)
        if sums is None:
            return None
        m = int(xv.shape[0] * xv.shape[2])
        s1, s2 = sums[0].sum(0), sums[1].sum(0)
        mean_p = s1 / m
        var = torch.clamp_min(s2 - s1 * mean_p, 0.0) / m
        na, nb = bn.neg_e(mean_p, var)
        res = kernels.call(lay, "resid", xv, yv, p, na.view(-1, 1), nb.view(-1, 1))
        out = None if res is None else (sums[0], sums[1], res[0], sums[2], sums[3])
    else:
        assert bn.rm is not None and bn.rv is not None
        na, nb = bn.neg_e(bn.rm - pivot, bn.rv)
        out = kernels.call(lay, "full", xv, yv, p, na.view(-1, 1), nb.view(-1, 1))
    if out is None:
        return None
    kernels.count_layer()
    s1r, s2r, great, xmax, xmin, *more = out
    length = int(xv.shape[2])
    if lay == "fold":  # one slot per channel, whose extremes of x are the channel's
        # the "train" kernel adds sample 0's sums and extremes (s1, s2, max, min)
        first = SampleSums(more[0], more[1], more[3], more[2], length) if more else None
        return Partials(
            layout=lay,
            pivot=pivot,
            s1=s1r.unsqueeze(0),
            s2=s2r.unsqueeze(0),
            great=great.unsqueeze(1),
            xmin=xmin,
            xmax=xmax,
            target=target,
            compiled=True,
            sample0=first,
        )
    return Partials(
        layout=lay,
        pivot=pivot,
        s1=s1r,
        s2=s2r,
        great=great,
        xmin=xmin.amin(0),
        xmax=xmax.amax(0),
        target=target,
        compiled=True,
        sample0=SampleSums(s1r[0], s2r[0], xmin[0], xmax[0], length)
        if bn.batch and xv.shape[0] > 1
        else None,
    )


def _pivot(xv: torch.Tensor) -> torch.Tensor:
    """(C,) float64: per channel, the mean of up to ~32 values of x spread over samples and
    plane (a strided view: nothing is copied). Close to the channel's mean, so that the sums of
    (x - p)² keep their digits; a poor pivot is caught after the pass (PIVOT_RATIO)."""
    n, _, length = (int(s) for s in xv.shape)
    sample = xv[:: max(1, n // 4), :, :: max(1, length // 8)]
    # one call (widened as it is read; the same values as widening first): a torch call in a hook
    # costs ~50 µs, 2-3x its warm cost, once the model's convolutions have evicted the caches
    return sample.mean(dim=(0, 2), dtype=F64)


def _bufs(buf: torch.Tensor, blk: Block) -> torch.Tensor:
    nb, cb, lb = blk.shape
    return buf[: 3 * nb * cb * lb].view(3, nb, cb, lb)


def _load_x(xv: torch.Tensor, buf: torch.Tensor, p3: torch.Tensor, blk: Block) -> torch.Tensor:
    """The block's three buffers, with x - p converted into the first."""
    b3 = _bufs(buf, blk)
    b3[0].copy_(xv[blk.ns, blk.cs, blk.ls])
    b3[0].sub_(p3[:, blk.cs])
    return b3


def _sums(b3: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ(x - p), Σ(x - p)²) per slot of the block: (nb, cb) for "rows", else (1, cb)."""
    xp = b3[0]
    if mode == "rows":
        return xp.sum(2), torch.linalg.vector_norm(xp, dim=2).square_()
    if mode == "fold":
        norm = torch.linalg.vector_norm(torch.linalg.vector_norm(xp, dim=2), dim=0, keepdim=True)
        return xp.sum(2).sum(0, keepdim=True), norm.square_()
    x2, sq = xp[:, :, 0], b3[2][:, :, 0]  # planes of one value (BatchNorm1d); b3[2] is free
    torch.mul(x2, x2, out=sq)
    return x2.sum(0, keepdim=True), sq.sum(0, keepdim=True)


def _extremes(t: torch.Tensor, mode: str, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """amax or amin of a (..., nb, cb, lb) block per slot: (..., nb, cb) for "rows", else
    (..., 1, cb)."""
    if mode == "rows":
        return op(t, -1)
    return op(t, (-3, -1)).unsqueeze(-2)


def fused_check(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    use_batch_stats: bool,
    eps: float,
    tol: Tolerance,
    target: int | None = None,
) -> FusedResult | None:
    """Statistics and comparison of one BN call, equal to the reference path's.

    x, y: (N, C, *S) floating tensors of one shape; gamma, beta, running_*: (C,) float64.
    Returns None when the fused path does not apply (empty or non-float tensors, or strides that
    cannot be viewed as (N, C, L)); the caller then uses the reference path.
    """
    if x.shape != y.shape or x.dim() < 2 or x.numel() == 0:
        return None
    if not (x.is_floating_point() and y.is_floating_point()):
        return None
    xv, yv = view3(x), view3(y)
    if xv is None or yv is None:
        return None
    from .fused_verdict import Host, verdict

    batch = use_batch_stats or running_mean is None or running_var is None
    target = target or block_elems(x.device)
    rm, rv = running_mean, running_var
    # the running statistics, on the host where they normalized the output; torch's square root
    running = None if batch or rm is None or rv is None else (rm, torch.sqrt(rv + eps))
    with torch.no_grad(), np.errstate(all="ignore"):  # NaN and Inf follow BN's conventions
        bn = BnArgs(gamma, beta, rm, rv, batch, eps)
        part = fused_pass(xv, yv, bn, target)
        m = int(xv.shape[0] * xv.shape[2])
        host = Host.of(part, gamma, beta, running, m, bn.eps if batch else None)
        redo = host.poor.nonzero()[0].tolist() if host.poor.any() else []
        if redo:  # rare: sum those channels again around the mean the first pass found
            better = torch.from_numpy(host.pivot + host.mean_p).to(x.device)
            spans = runs(redo)
            if part.compiled or len(spans) > MAX_REDO_SPANS:
                # one more pass over the whole layer: scattered channels, or the compiled
                # kernel (same shapes: no new compile, same layout)
                poor = torch.from_numpy(host.poor).to(x.device)
                pivots = torch.where(poor, better, part.pivot)
                again = _compiled_pass(xv, yv, bn, target, pivots) if part.compiled else None
                # the eager pass where the kernel was not used or has failed since
                part = again or fused_pass(xv, yv, bn, target, pivot=pivots, use_kernel=False)
                spans = []
            for c0, c1 in spans:
                cs = slice(c0, c1)
                sub = fused_pass(
                    xv[:, cs],
                    yv[:, cs],
                    bn.channels(cs),
                    target,
                    pivot=better[cs],
                    use_kernel=False,
                )
                part.splice(cs, sub)
            host = Host.of(part, gamma, beta, running, m, bn.eps if batch else None)
        return verdict(x, y, xv, yv, part, host, bn, tol)


def runs(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted channel indices as [start, stop) runs of consecutive channels."""
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
