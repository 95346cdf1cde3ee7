"""What a hypothesis predicts: the screening sample and the predictor types.

Every hypothesis is a *predictor* of the reference output, evaluated two ways: on a chunk of the
BN input (the exact, chunked float64 pass) and on a small fixed sample of positions (screening).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .recompute import F64, _bcast

SAMPLE_SIZE = 32
"""Positions per channel in the screening sample."""


# --- the screening sample ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    """The same K positions (sample index n, spatial index s) taken from every channel."""

    n: torch.Tensor
    """(K,) sample indices."""
    s: tuple[torch.Tensor, ...]
    """One (K,) index tensor per spatial axis."""
    x: torch.Tensor
    """(K, C) float64."""
    y: torch.Tensor
    """(K, C) float64 reference values."""
    y_torch: torch.Tensor | None = None


def take_sample(
    x: torch.Tensor, y: torch.Tensor, y_torch: torch.Tensor | None, k: int = SAMPLE_SIZE
) -> Sample:
    """K spread-out positions (deterministic jitter) gathered from x, y_ref and PyTorch's output."""
    shape = tuple(int(s) for s in x.shape)
    spatial = shape[2:]
    plane = 1
    for s in spatial:
        plane *= s
    m = shape[0] * plane
    k = max(1, min(k, m))
    g = torch.Generator().manual_seed(0)
    jitter = torch.rand(k, generator=g, dtype=F64)
    pos = ((torch.arange(k, dtype=F64) + jitter) * (m / k)).long().clamp(0, m - 1)
    pos = pos.to(x.device)
    n_idx = pos // plane
    rest = pos % plane
    s_idx: list[torch.Tensor] = []
    for size in reversed(spatial):
        s_idx.append(rest % size)
        rest = rest // size
    s_idx.reverse()
    index: tuple[torch.Tensor | slice, ...] = (n_idx, slice(None), *s_idx)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[index].to(F64).reshape(k, shape[1])

    return Sample(n_idx, tuple(s_idx), take(x), take(y), None if y_torch is None else take(y_torch))


# --- predictors ----------------------------------------------------------------------------------
class Predictor:
    """What a hypothesis says the reference is: on a chunk of x, and on the sample."""

    def chunk(self, xc: torch.Tensor, ns: slice, cs: slice) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, s: Sample) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, xabs: torch.Tensor) -> torch.Tensor:
        """(C,) size of the numbers the foreign code handles on each channel (rounding scale)."""
        raise NotImplementedError


@dataclass(eq=False)
class ChannelAffine(Predictor):
    """y = A·x + B with (L,) coefficients along `axis` (1: the channel axis)."""

    a: torch.Tensor
    b: torch.Tensor
    beta: torch.Tensor
    axis: int = 1

    def chunk(self, xc: torch.Tensor, ns: slice, cs: slice) -> torch.Tensor:
        if self.axis == 1:
            return xc * _bcast(self.a[cs], xc.dim()) + _bcast(self.b[cs], xc.dim())
        shape = [1] * xc.dim()
        shape[self.axis] = -1
        return xc * self.a.reshape(shape) + self.b.reshape(shape)

    def sample(self, s: Sample) -> torch.Tensor:
        if self.axis == 1:
            return s.x * self.a + self.b
        i = s.s[self.axis - 2]
        return s.x * self.a[i][:, None] + self.b[i][:, None]

    def scale(self, xabs: torch.Tensor) -> torch.Tensor:
        if self.axis == 1:
            return self.a.abs() * xabs + self.b.abs() + self.beta.abs()
        return self.a.abs().max() * xabs + self.b.abs().max() + self.beta.abs().max()


@dataclass(eq=False)
class GroupAffine(Predictor):
    """y = A[g, c]·x + B[g, c] where g is the sample's group: samples [g·G, (g+1)·G)."""

    a: torch.Tensor
    """(groups, C)."""
    b: torch.Tensor
    beta: torch.Tensor
    group: int

    def _rows(self, n: torch.Tensor) -> torch.Tensor:
        return (n // self.group).clamp_max(self.a.shape[0] - 1)

    def chunk(self, xc: torch.Tensor, ns: slice, cs: slice) -> torch.Tensor:
        n = torch.arange(ns.start or 0, (ns.start or 0) + xc.shape[0], device=xc.device)
        rows = self._rows(n)
        extra = (1,) * (xc.dim() - 2)
        a = self.a[rows][:, cs].reshape(*self.a[rows][:, cs].shape, *extra)
        b = self.b[rows][:, cs].reshape(*self.b[rows][:, cs].shape, *extra)
        return xc * a + b

    def sample(self, s: Sample) -> torch.Tensor:
        rows = self._rows(s.n)
        return s.x * self.a[rows] + self.b[rows]

    def scale(self, xabs: torch.Tensor) -> torch.Tensor:
        return self.a.abs().amax(0) * xabs + self.b.abs().amax(0) + self.beta.abs()


@dataclass(eq=False)
class SampleAffine(Predictor):
    """y = γ_c·r_n·(x - μ_n) + β_c: statistics per sample (LayerNorm-like), parameters per channel.

    r_n = 1/sqrt(var_n + eps).
    """

    gamma: torch.Tensor
    beta: torch.Tensor
    mu: torch.Tensor
    """(N,) per-sample mean."""
    r: torch.Tensor
    """(N,) per-sample 1/sqrt(var + eps)."""

    def _coef(self, n: torch.Tensor, cs: slice) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.r[n][:, None] * self.gamma[cs][None, :]
        return a, self.beta[cs][None, :] - a * self.mu[n][:, None]

    def chunk(self, xc: torch.Tensor, ns: slice, cs: slice) -> torch.Tensor:
        n = torch.arange(ns.start or 0, (ns.start or 0) + xc.shape[0], device=xc.device)
        a, b = self._coef(n, cs)
        extra = (1,) * (xc.dim() - 2)
        return xc * a.reshape(*a.shape, *extra) + b.reshape(*b.shape, *extra)

    def sample(self, s: Sample) -> torch.Tensor:
        a, b = self._coef(s.n, slice(None))
        return s.x * a + b

    def scale(self, xabs: torch.Tensor) -> torch.Tensor:
        rmax = self.r.abs().max()
        return self.gamma.abs() * rmax * (xabs + self.mu.abs().max()) + self.beta.abs()


@dataclass(eq=False)
class Direct(Predictor):
    """PyTorch's own output tensor, as the prediction (matches_pytorch)."""

    y: torch.Tensor
    formula: ChannelAffine

    def chunk(self, xc: torch.Tensor, ns: slice, cs: slice) -> torch.Tensor:
        return self.y[ns, cs].to(F64)

    def sample(self, s: Sample) -> torch.Tensor:
        assert s.y_torch is not None
        return s.y_torch

    def scale(self, xabs: torch.Tensor) -> torch.Tensor:
        return self.formula.scale(xabs)


@dataclass(eq=False)
class Mapped(Predictor):
    """An elementwise function (an activation, a clamp) applied to another prediction."""

    base: Predictor
    fn: Callable[[torch.Tensor, slice], torch.Tensor]
    """fn(prediction, channel slice)."""

    def chunk(self, xc: torch.Tensor, ns: slice, cs: slice) -> torch.Tensor:
        return self.fn(self.base.chunk(xc, ns, cs), cs)

    def sample(self, s: Sample) -> torch.Tensor:
        return self.fn(self.base.sample(s), slice(None))

    def scale(self, xabs: torch.Tensor) -> torch.Tensor:
        return self.base.scale(xabs)
