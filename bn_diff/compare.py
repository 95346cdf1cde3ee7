"""Tolerances and mismatch statistics: PyTorch's BN output against the float64 by-hand value.

An element mismatches when |actual - expected| > atol + rtol·|expected| + allowance_c, where
`expected` is the float64 recompute and allowance_c is the channel's honest-rounding allowance
(0 when the user gives --atol/--rtol). NaN agrees with NaN (the input can carry NaN), equal
infinities agree, anything else involving NaN mismatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .recompute import F64, Moments, _bcast, chunk_slices, chunks, reduce_dims
from .results import Tolerance, default_pair


@dataclass(frozen=True, slots=True)
class Comparison:
    """Per-channel and whole-layer mismatch statistics of one BN output."""

    channel_max_abs: torch.Tensor
    """(C,) float64: greatest |actual - expected| per channel."""
    channel_mismatched: torch.Tensor
    """(C,) int64: elements outside tolerance per channel."""
    numel: int
    mismatched: int
    max_abs_diff: float
    max_abs_index: tuple[int, ...]
    max_rel_diff: float
    max_rel_index: tuple[int, ...]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve(tol: Tolerance, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) in force for an output of this dtype."""
    if tol.explicit:
        assert tol.atol is not None and tol.rtol is not None
        return tol.atol, tol.rtol
    return default_pair(dtype_name(dtype))


def rounding_allowance(
    tol: Tolerance,
    dtype: torch.dtype,
    moments: Moments,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """(C,) float64: k·eps_dtype·((max|x_c| + |mean_c|)·|gamma_c|/sqrt(var_c + eps) + |beta_c|).

    This is the size of the rounding error an honest float BN makes on channel c: the subtraction
    x - mean cancels digits when |mean| ≫ std, and the scale gamma/sqrt(var+eps) magnifies them.
    Zero when the user gave an explicit tolerance.
    """
    if tol.explicit:
        return torch.zeros_like(mean)
    return allowance(tol, dtype, moments.absmax, mean, torch.sqrt(var + eps), gamma, beta)


TensorOrArray = TypeVar(
    "TensorOrArray", torch.Tensor, "np.ndarray[tuple[int, ...], np.dtype[np.float64]]"
)


def allowance(
    tol: Tolerance,
    dtype: torch.dtype,
    absmax: TensorOrArray,
    mean: TensorOrArray,
    sd: TensorOrArray,
    gamma: TensorOrArray,
    beta: TensorOrArray,
) -> TensorOrArray:
    """`rounding_allowance` (for a tolerance that is not explicit) from max|x|, mean,
    sd = sqrt(var + eps), gamma and beta: torch tensors, or float64 NumPy arrays (the fused path's
    host arithmetic), with the same IEEE operations in the same order either way."""
    fin = torch.finfo(dtype) if dtype.is_floating_point else torch.finfo(torch.float32)
    scale = (absmax + abs(mean)) * abs(gamma) / sd + abs(beta)
    allow = tol.rounding_k * fin.eps * scale
    # NaN/Inf statistics (a NaN input) give no allowance rather than an infinite one.
    if isinstance(allow, torch.Tensor):
        return torch.nan_to_num(allow, nan=0.0, posinf=0.0, neginf=0.0)
    return np.where(np.isfinite(allow), allow, 0.0)  # nan_to_num's bits, a third of its time


def compare(
    x: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    atol: float,
    rtol: float,
    allowance: torch.Tensor,
) -> Comparison:
    """Compare y with gamma·(x - mean)/sqrt(var + eps) + beta, chunk by chunk, in float64."""
    c = int(x.shape[1])
    dev = x.device
    nd = x.dim()
    dims = reduce_dims(nd)
    ch_max = torch.zeros(c, dtype=F64, device=dev)
    ch_cnt = torch.zeros(c, dtype=torch.int64, device=dev)
    best_abs, best_abs_idx = -1.0, (0,) * nd
    best_rel, best_rel_idx = -1.0, (0,) * nd
    numel = x.numel()
    for idx in chunk_slices(x.shape):
        cs = idx[1] if len(idx) > 1 else slice(None)
        xc = x[idx].to(F64)
        # literal order of the contract: (x - mean) / sqrt(var + eps), then * gamma + beta
        e = (xc - _bcast(mean[cs], nd)) / torch.sqrt(_bcast(var[cs], nd) + eps)
        e = e * _bcast(gamma[cs], nd) + _bcast(beta[cs], nd)
        yc = y[idx].to(F64)
        d = (yc - e).abs()
        same = (yc == e) | (yc.isnan() & e.isnan())
        d = torch.where(same, torch.zeros((), dtype=F64, device=dev), d)
        d = torch.nan_to_num(d, nan=float("inf"))
        bound = atol + rtol * e.abs().nan_to_num(nan=0.0, posinf=0.0) + _bcast(allowance[cs], nd)
        bad = d > bound
        if nd > 1 and d.numel():
            ch_max[cs] = torch.maximum(ch_max[cs], d.amax(dim=dims))
            ch_cnt[cs] += bad.sum(dim=dims)
        if d.numel() == 0:
            continue
        flat = int(torch.argmax(d).item())
        val = float(d.reshape(-1)[flat].item())
        if val > best_abs:
            best_abs = val
            best_abs_idx = _offset(_unravel(flat, d.shape), idx)
        rel = d / e.abs()
        rel = torch.where(d == 0, torch.zeros((), dtype=F64, device=dev), rel)
        rel = torch.nan_to_num(rel, nan=float("inf"))
        rflat = int(torch.argmax(rel).item())
        rval = float(rel.reshape(-1)[rflat].item())
        if rval > best_rel:
            best_rel = rval
            best_rel_idx = _offset(_unravel(rflat, rel.shape), idx)
    return Comparison(
        channel_max_abs=ch_max,
        channel_mismatched=ch_cnt,
        numel=numel,
        mismatched=int(ch_cnt.sum().item()),
        max_abs_diff=max(best_abs, 0.0),
        max_abs_index=best_abs_idx,
        max_rel_diff=max(best_rel, 0.0),
        max_rel_index=best_rel_idx,
    )


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for s in reversed(shape):
        idx.append(flat % int(s))
        flat //= int(s)
    return tuple(reversed(idx))


def _offset(idx: tuple[int, ...], block: tuple[slice, ...]) -> tuple[int, ...]:
    """An index into a block, as an index into the whole tensor."""
    return tuple(i + (int(block[a].start or 0) if a < len(block) else 0) for a, i in enumerate(idx))


def absdiff(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in float64: 0 where equal or both NaN, inf where only one is NaN."""
    a = actual.to(F64)
    e = expected.to(F64)
    d = (a - e).abs()
    same = (a == e) | (a.isnan() & e.isnan())
    return torch.where(same, torch.zeros_like(d), d).nan_to_num(nan=float("inf"))


def close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float
) -> tuple[float, bool]:
    """(max |actual - expected|, all within atol + rtol·|expected|), chunk by chunk in float64."""
    if expected.dim() < 2:
        actual, expected = actual.reshape(1, -1), expected.reshape(1, -1)
    worst, ok = 0.0, True
    for ns, cs in chunks(expected.shape):
        e = expected[ns, cs]
        d = absdiff(actual[ns, cs], e)
        if d.numel():
            worst = max(worst, float(d.max().item()))
            bound = atol + rtol * e.to(F64).abs().nan_to_num(nan=0.0)
            ok = ok and bool((d <= bound).all().item())
    return worst, ok
