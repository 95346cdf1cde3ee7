"""BatchNorm by hand in float64: pure functions, no hooks, no I/O.

The contract (DESIGN.md, "The arithmetic"): x has shape (N, C, *S); statistics reduce over every
axis except 1; m = N·prod(S).
  train: y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta   (var_B biased)
  eval:  y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta
Everything is computed in float64 on the tensor's own device, a bounded chunk at a time, so that a
huge activation never gets a float64 twin.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

F64 = torch.float64

Vec = npt.NDArray[np.float64]
"""Float64 per-channel vectors on the host. The small per-channel arithmetic after a layer's pass
(pipeline.check_call) is done on them in NumPy, in the same operations and order as the torch
formulas here, to the same bits: IEEE add, multiply, divide, abs and max are correctly rounded
in both; square roots are torch's (on CPU not always NumPy's)."""

CHUNK_ELEMS = 1 << 17
"""Elements per chunk (1 MiB of float64): small enough to stay in cache, large enough to amortise
the per-call overhead of torch ops."""


def reduce_dims(ndim: int) -> tuple[int, ...]:
    """Axes the per-channel statistics reduce over: all but axis 1."""
    return (0, *range(2, ndim))


def values_per_channel(shape: tuple[int, ...] | torch.Size) -> int:
    """m = N·prod(S): how many values each channel's statistics are computed from."""
    m = int(shape[0])
    for s in shape[2:]:
        m *= int(s)
    return m


def chunks(
    shape: tuple[int, ...] | torch.Size, target: int | None = None
) -> Iterator[tuple[slice, slice]]:
    """(sample slice, channel slice) blocks of about `target` elements covering an (N, C, *S) tensor.

    A block is at least one (sample, channel) plane. `target` defaults to CHUNK_ELEMS.
    `chunk_slices` also splits planes, so that no block exceeds `target`.
    """
    target = CHUNK_ELEMS if target is None else target
    n, c = int(shape[0]), int(shape[1])
    plane = 1
    for s in shape[2:]:
        plane *= int(s)
    plane = max(plane, 1)
    if plane * c <= target:
        nb = max(1, target // max(plane * c, 1))
        for n0 in range(0, n, nb):
            yield slice(n0, min(n, n0 + nb)), slice(0, c)
    else:
        cb = max(1, target // plane)
        for n0 in range(n):
            for c0 in range(0, c, cb):
                yield slice(n0, n0 + 1), slice(c0, min(c, c0 + cb))


def chunk_slices(
    shape: tuple[int, ...] | torch.Size, target: int | None = None
) -> Iterator[tuple[slice, ...]]:
    """Index tuples covering an (N, C, *S) tensor in blocks of at most `target` elements
    (CHUNK_ELEMS by default; one element at least), in (n, c, *s) order.

    Each block is a run of consecutive indices in that order: one index on the leading axes, a
    range on one axis, everything on the axes after it. So a huge (sample, channel) plane is
    split too, and the first maximum over the blocks is the first maximum of the tensor.
    """
    target = max(1, CHUNK_ELEMS if target is None else target)
    dims = [int(d) for d in shape]
    if any(d == 0 for d in dims):
        return
    inner = [1] * len(dims)
    for i in range(len(dims) - 2, -1, -1):
        inner[i] = inner[i + 1] * dims[i + 1]
    k = next(i for i in range(len(dims)) if inner[i] <= target)
    step = max(1, target // inner[k])
    for lead in _product(dims[:k]):
        for a0 in range(0, dims[k], step):
            yield (*(slice(i, i + 1) for i in lead), slice(a0, min(dims[k], a0 + step)))


def _product(dims: list[int]) -> Iterator[tuple[int, ...]]:
    """All index tuples of a shape, in row-major order."""
    if not dims:
        yield ()
        return
    for i in range(dims[0]):
        for rest in _product(dims[1:]):
            yield (i, *rest)


@dataclass(frozen=True, slots=True)
class Moments:
    """Per-channel statistics of a tensor, all float64 tensors of shape (C,)."""

    mean: torch.Tensor
    var: torch.Tensor
    """Biased variance (divides by m)."""
    min: torch.Tensor
    max: torch.Tensor
    count: int
    """m, the values per channel."""

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    @property
    def var_unbiased(self) -> torch.Tensor:
        """var·m/(m-1): what PyTorch folds into running_var (NaN for m = 1)."""
        if self.count <= 1:
            return torch.full_like(self.var, float("nan"))
        return self.var * (self.count / (self.count - 1))


def channel_moments(x: torch.Tensor) -> Moments:
    """Mean, biased variance, min and max per channel, in float64, one bounded chunk at a time.

    Chunks are merged with Chan's parallel update, which is as exact as a two-pass algorithm.
    """
    if 0 < x.numel() <= CHUNK_ELEMS:
        return _one_chunk(x)
    return _merged(x)


def _merged(x: torch.Tensor) -> Moments:
    """`channel_moments` chunk by chunk, merged."""
    c = int(x.shape[1])
    dev = x.device
    mean = torch.zeros(c, dtype=F64, device=dev)
    m2 = torch.zeros(c, dtype=F64, device=dev)
    lo = torch.full((c,), float("inf"), dtype=F64, device=dev)
    hi = torch.full((c,), float("-inf"), dtype=F64, device=dev)
    count = torch.zeros(c, dtype=F64, device=dev)
    dims = reduce_dims(x.dim())
    for idx in chunk_slices(x.shape):
        cs = idx[1] if len(idx) > 1 else slice(None)
        xc = x[idx].to(F64)
        nb = values_per_channel(xc.shape)
        if nb == 0:
            continue
        cm = xc.mean(dim=dims)
        d = xc - _bcast(cm, xc.dim())
        cm2 = (d * d).sum(dim=dims)
        n_a = count[cs]
        tot = n_a + nb
        delta = cm - mean[cs]
        mean[cs] += delta * (nb / tot)
        # a channel's first chunk has no cross term (where δ² overflows, δ²·0 would be NaN)
        cross = delta * delta * (n_a * nb / tot)
        m2[cs] += cm2 + torch.where(n_a > 0, cross, 0.0)
        count[cs] = tot
        lo[cs] = torch.minimum(lo[cs], xc.amin(dim=dims))
        hi[cs] = torch.maximum(hi[cs], xc.amax(dim=dims))
    m = values_per_channel(x.shape)
    var = m2 / m if m > 0 else torch.full_like(m2, float("nan"))
    if m == 0:
        mean = torch.full_like(mean, float("nan"))
    return Moments(mean=mean, var=var, min=lo, max=hi, count=m)


def _one_chunk(x: torch.Tensor) -> Moments:
    """`channel_moments` of a tensor that is one chunk, without the merge: merging one chunk
    into the zeros gives the chunk's own numbers (mean 0 + cm·1, m2 0 + cm2 + 0: the merge skips
    a first chunk's cross term), so these are the same values in a third of the torch calls. The
    `+ 0.0` is the merge's: it makes a mean of -0.0 +0.0, as there."""
    dims = reduce_dims(x.dim())
    xc = x.to(F64)
    mean = xc.mean(dim=dims).add_(0.0)
    d = xc - _bcast(mean, xc.dim())
    var = (d * d).sum(dim=dims) / values_per_channel(x.shape)
    lo, hi = xc.amin(dim=dims), xc.amax(dim=dims)
    return Moments(mean=mean, var=var, min=lo, max=hi, count=values_per_channel(x.shape))


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Shape a (C,) vector to broadcast along axis 1 of an ndim tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def as_f64(v: torch.Tensor | None, c: int, fill: float, device: torch.device) -> torch.Tensor:
    """A (C,) float64 copy of a parameter or buffer; `fill` when it is None (affine=False)."""
    if v is None:
        return torch.full((c,), fill, dtype=F64, device=device)
    return v.detach().to(device=device, dtype=F64).reshape(-1)


def coefficients(
    mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with y = a·x + b per channel: a = gamma/sqrt(var+eps), b = beta - a·mean."""
    a = gamma / torch.sqrt(var + eps)
    return a, beta - a * mean


def batch_norm_by_hand(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, literally, in float64.

    `x` may be any chunk whose axis 1 matches the (C,) vectors given.
    """
    nd = x.dim()
    x64 = x.to(F64)
    y = (x64 - _bcast(mean, nd)) / torch.sqrt(_bcast(var, nd) + eps)
    return y * _bcast(gamma, nd) + _bcast(beta, nd)


@dataclass(frozen=True, slots=True)
class RunningStats:
    """Running buffers after one train-mode forward, as PyTorch should have written them."""

    mean: torch.Tensor
    var: torch.Tensor
    num_batches_tracked: int | None
    momentum_used: float


def running_update(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: int | None,
    moments: Moments,
    momentum: float | None,
) -> RunningStats:
    """new = (1-k)·old + k·batch, with the *unbiased* batch variance for running_var.

    k = momentum, or 1/num_batches_tracked (after its increment) when momentum is None.
    """
    nbt, k = update_momentum(num_batches_tracked, momentum)
    rm = running_mean.to(F64)
    rv = running_var.to(F64)
    new_mean = (1 - k) * rm + k * moments.mean
    new_var = (1 - k) * rv + k * moments.var_unbiased
    return RunningStats(mean=new_mean, var=new_var, num_batches_tracked=nbt, momentum_used=k)


def update_momentum(
    num_batches_tracked: int | None, momentum: float | None
) -> tuple[int | None, float]:
    """(num_batches_tracked after the increment, k) of `running_update`."""
    nbt = None if num_batches_tracked is None else num_batches_tracked + 1
    if momentum is None:
        return nbt, 1.0 / nbt if nbt else 0.0
    return nbt, float(momentum)
