"""What a fused pass is made of and what it leaves (bn_diff/fused.py): the blocks it walks, the BN
call as it takes it (`BnArgs`), and its partial results (`Partials`, `SampleSums`).

Blocks are channel-major: `plan` groups them so that a channel's statistics are complete before
its comparison starts; `region` says which samples and plane segment block k of a channel covers
(also the region a "split" slot stands for when the verdict searches it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Block:
    """One block of the (N, C, L) view of x: samples, a segment of the plane, channels."""

    ns: slice
    ls: slice
    cs: slice

    @property
    def shape(self) -> tuple[int, int, int]:
        return (
            int(self.ns.stop - self.ns.start),
            int(self.cs.stop - self.cs.start),
            int(self.ls.stop - self.ls.start),
        )

    @property
    def numel(self) -> int:
        nb, cb, lb = self.shape
        return nb * cb * lb


@dataclass(frozen=True, slots=True)
class BnArgs:
    """One BN call as every pass and the verdict take it: float64 (C,) parameters and statistics,
    and whether the output was normalized with the batch statistics."""

    gamma: torch.Tensor
    beta: torch.Tensor
    rm: torch.Tensor | None
    rv: torch.Tensor | None
    batch: bool
    eps: float

    def channels(self, cs: slice) -> BnArgs:
        """The same call restricted to channels cs."""
        rm, rv = self.rm, self.rv
        return BnArgs(
            self.gamma[cs],
            self.beta[cs],
            None if rm is None else rm[cs],
            None if rv is None else rv[cs],
            self.batch,
            self.eps,
        )

    def neg_e(
        self, offset: torch.Tensor, var: torch.Tensor, cs: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(na, nb) with -e = na·(x - p) + nb for channels cs, normalized with `var` and a mean
        `offset` from the pivot p: a = gamma/sqrt(var + eps), na = -a, nb = a·offset - beta."""
        a = self.gamma[cs] / torch.sqrt(var + self.eps)
        return -a, a * offset - self.beta[cs]


def plan(n: int, c: int, length: int, target: int) -> tuple[int, Iterator[list[Block]]]:
    """(blocks per channel, groups): channel groups in channel order, each a list of blocks of at
    most `target` elements (at least one) that together cover those channels for all samples."""
    target = max(1, target)
    if n * length <= target:
        cb = max(1, target // max(n * length, 1))
        groups = (
            [Block(slice(0, n), slice(0, length), slice(c0, min(c, c0 + cb)))]
            for c0 in range(0, c, cb)
        )
        return 1, groups
    per = blocks_per_channel(n, length, target)
    return per, (
        [Block(*region(k, n, length, target), slice(c0, c0 + 1)) for k in range(per)]
        for c0 in range(c)
    )


def blocks_per_channel(n: int, length: int, target: int) -> int:
    """How many blocks cover one channel (1 while a channel fits in one block)."""
    if n * length <= target:
        return 1
    if length <= target:
        return -(-n // max(1, target // length))
    return n * -(-length // target)


def region(k: int, n: int, length: int, target: int) -> tuple[slice, slice]:
    """(samples, plane segment) of block k of a channel, in the layout `plan` uses."""
    if n * length <= target:
        return slice(0, n), slice(0, length)
    if length <= target:
        nb = max(1, target // length)
        return slice(k * nb, min(n, (k + 1) * nb)), slice(0, length)
    segs = -(-length // target)
    n0, g = divmod(k, segs)
    return slice(n0, n0 + 1), slice(g * target, min(length, (g + 1) * target))


@dataclass(frozen=True, slots=True)
class SampleSums:
    """Sample 0's own partial results per channel, (C,) float64, where a pass has them at no
    extra read: the first row of "rows", a by-product of "fold". The health check of batch
    dependence (health_batch) needs sample 0's moments; from here it need not walk x[:1] again."""

    s1: torch.Tensor
    """Σ(x - p) over sample 0's values of each channel (p the pass's pivot)."""
    s2: torch.Tensor
    """Σ(x - p)²."""
    xmin: torch.Tensor
    xmax: torch.Tensor
    count: int
    """Values per channel in one sample (L)."""


@dataclass(frozen=True, slots=True)
class Partials:
    """What one pass leaves: partial results per slot (a row of samples) and channel."""

    layout: str
    """"rows": slot r is sample r; "fold": one slot, all samples; "split": slot k is block k of
    each channel (see `region`)."""
    pivot: torch.Tensor
    """(C,) float64: the value subtracted from x before summing."""
    s1: torch.Tensor
    """(slots, C) float64: Σ(x - p) per slot."""
    s2: torch.Tensor
    """(slots, C) float64: Σ(x - p)² per slot."""
    great: torch.Tensor
    """(2, slots, C) float64: the greatest |y - e| and |(y - e)/e| (NaN where 0/0 occurred)."""
    xmin: torch.Tensor
    """(C,) float64: min of x, taken from x itself (exact)."""
    xmax: torch.Tensor
    target: int
    compiled: bool = False
    """Made by the compiled kernel (bn_diff/kernels.py), whose layouts differ from this pass's."""
    sample0: SampleSums | None = None
    """Sample 0's own sums, where the output was normalized with the batch statistics of at least
    two samples (the only case where health_batch measures batch dependence) and the layout gives
    them for free (None: running statistics, a batch of one, "split", one-value planes)."""

    def splice(self, cs: slice, other: Partials) -> None:
        """Put `other`, a pass over channels cs only, in place of those channels (the same
        layout and slots: a broadcast would silently mix them)."""
        if other.layout != self.layout or other.s1.shape[0] != self.s1.shape[0]:
            raise ValueError(f"cannot splice a {other.layout} pass into a {self.layout} one")
        mine, theirs = self.sample0, other.sample0
        if mine is not None and theirs is None:  # half of sample 0's sums would be stale
            raise ValueError("cannot splice a pass without sample 0's sums into one with them")
        self.pivot[cs] = other.pivot
        self.s1[:, cs], self.s2[:, cs] = other.s1, other.s2
        self.great[..., cs] = other.great
        self.xmin[cs], self.xmax[cs] = other.xmin, other.xmax
        if mine is not None and theirs is not None:
            mine.s1[cs], mine.s2[cs] = theirs.s1, theirs.s2
            mine.xmin[cs], mine.xmax[cs] = theirs.xmin, theirs.xmax

    def slot_region(self, slot: int, n: int, length: int) -> tuple[slice, slice]:
        """(samples, plane segment) that slot `slot` of a channel covers."""
        if self.layout == "rows":
            return slice(slot, slot + 1), slice(0, length)
        if self.layout == "fold":
            return slice(0, n), slice(0, length)
        return region(slot, n, length, self.target)
