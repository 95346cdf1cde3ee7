"""The health checks' cheap first look: could anything about this layer's vectors be wrong?

Most layers are healthy, and the health stage runs inside every BN hook, so its cost on a healthy
layer is what matters (issue 7: bn-diff run within 1.3x of a plain forward). The checks that look
at the layer's per-channel vectors (nonfinite_stats, nonpositive_running_var, tiny_running_var,
untrained_running_stats, stats_shift, fp16_overflow_risk, dead_channel) each cost several small
tensor ops and transfers to Python. `suspicious` asks all of them at once, in a dozen NumPy calls
over the (C,) vectors brought to the host once; only when it says yes do the checks run, and they
decide exactly as before.

It never misses a finding: its condition for each check is a superset of that check's (the
reasoning is beside each), so when it says no, none of those checks would have added anything.
The vectors are never read from the activations: buffers and parameters come from the BnCall,
the batch moments from the `LayerResult` (`batch_moments`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from operator import attrgetter

import numpy as np
import torch

from .capture import BnCall
from .results import LayerResult

F64 = torch.float64
FP16_MAX = 65504.0
"""Largest finite float16."""
MARGIN = 1e-6
"""The stats_shift screen compares with thresholds this much (relatively) lower than the check's,
far more than the few roundings by which the two computations can differ."""
TINY = 1e-30
"""rv + ε below this (only possible with ε ≈ 0): the squared shift ratios could lose precision to
subnormal numbers (float32's start at 1.2e-38), so the screen leaves the decision to the check."""


def as_vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """A (C,) float64 CPU copy: per-channel vectors are small, and numbers end up in Python."""
    return None if t is None else t.detach().reshape(-1).to("cpu", F64)


def as_vecs(ts: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """`[as_vec(t) for t in ts]`, with the same values, in one stack and one transfer when the
    present tensors have the same length and device (one device sync on a GPU, not one each)."""
    present = [t.detach().reshape(-1) for t in ts if t is not None]
    if len(present) < 2:
        return [as_vec(t) for t in ts]
    try:  # widening conversions (stack promotes, then float64) are exact: values as as_vec's
        rows = iter(torch.stack(present).to("cpu", F64).unbind())
    except RuntimeError:  # different lengths or devices
        return [as_vec(t) for t in ts]
    return [None if t is None else next(rows) for t in ts]


_MEAN = attrgetter("batch_mean")
_VAR = attrgetter("batch_var")


def batch_moments(
    result: LayerResult, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and biased variance of every channel, (C,) float64 tensors on `device`.

    From `result.channels` without making its per-channel objects when it can hand out a column
    as a tensor (`ChannelTable.tensor`); else read from the `ChannelStats` objects. The values
    are the ChannelStats' floats either way.
    """
    chans = result.channels
    column = getattr(chans, "tensor", None)
    if callable(column):
        mean, var = column("batch_mean", device), column("batch_var", device)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            return mean, var
    return (
        torch.tensor(list(map(_MEAN, chans)), dtype=F64, device=device),
        torch.tensor(list(map(_VAR, chans)), dtype=F64, device=device),
    )


def suspicious(
    call: BnCall,
    result: LayerResult,
    z_thr: Callable[[BnCall], float],
    std_ratio: float,
    dead_gamma: float,
) -> bool:
    """Whether any check of the layer's vectors could add a finding (False: none would).

    `z_thr`, `std_ratio`, `dead_gamma`: the checks' thresholds (stats_shift's z for the call's
    batch, its std ratio, dead_channel's |γ|). Each torch call costs several microseconds inside
    a hook (the model's work has just evicted the caches), so the call's vectors come to the host
    once, as one float64 NumPy matrix (CPU tensors are read in place; a GPU's in one stack and
    one transfer: a kernel launch per small op would cost more than the op), and the rest is
    NumPy on (C,) vectors: each row's min and max, then the two shift ratios of every channel
    and their maxima. Widening to float64 is exact, so mins and maxes are the vectors' own.
    """
    rm, rv, gamma = call.running_mean_before, call.running_var_before, call.weight
    vecs = [rm, rv, gamma, call.bias]
    if call.updates_running_stats:
        vecs += [call.running_mean_after, call.running_var_after]
    rows = [t for t in vecs if t is not None]
    if not rows:
        return False  # no buffers, no parameters: none of these checks has anything to look at
    c = result.info.num_features
    shape = (c,)
    if c == 0 or any(t.shape != shape for t in rows):
        return True  # degenerate or unusual shapes: let the checks decide
    n = len(rows)
    mat = _host_matrix(rows, gamma is not None)
    if mat is None:  # tensors on different devices, or of a kind NumPy cannot take
        return True
    i_rv = None if rv is None else int(rm is not None)
    with np.errstate(all="ignore"):
        if gamma is not None:  # |γ| in the spare last row; γ's row follows rm's and rv's
            np.abs(mat[int(rm is not None) + int(rv is not None)], out=mat[n])
        # min and max of each row; NaN propagates into both
        mins, maxs = mat.min(axis=1).tolist(), mat.max(axis=1).tolist()
        # nonfinite_stats: a NaN/Inf in a vector is a NaN/Inf in its min or max
        if not all(map(math.isfinite, mins[:n] + maxs[:n])):
            return True
        eps = call.eps
        if i_rv is not None:
            # nonpositive_running_var (rv ≤ 0) and tiny_running_var (0 < rv ≤ eps) imply
            # rv ≤ max(eps, 0); fp16_overflow_risk: rv > 65504
            if mins[i_rv] <= max(eps, 0.0) or maxs[i_rv] > FP16_MAX:
                return True
        if gamma is not None:
            # dead_channel: min|γ| ≤ dead_gamma·max(1, max|γ|), the check's own numbers
            if mins[n] <= dead_gamma * max(1.0, maxs[n]):
                return True
        if rm is None or rv is None or i_rv is None:
            return False
        if result.info.num_batches_tracked in (None, 0):
            # untrained_running_stats: rm ≡ 0 and rv ≡ 1, i.e. min = max = 0 and min = max = 1
            if mins[0] == 0 == maxs[0] and mins[i_rv] == 1 == maxs[i_rv]:
                return True
        if not mins[i_rv] + eps >= TINY:
            return True  # see _shift_flagged
        moments = _host_moments(result)
        if moments is None:
            return True
        bm, bv = moments
        den = mat[i_rv] + eps  # float64: closer still to the check's numbers than float32's
        z2 = float(np.max(np.square(bm - mat[0]) / den))
        r2 = float(np.max((bv + eps) / den))
    return _shift_flagged(z2, r2, z_thr(call), std_ratio, result)


_NUMPY_OK = (torch.float64, torch.float32, torch.float16)


def _host_matrix(rows: list[torch.Tensor], with_abs: bool) -> np.ndarray | None:  # type: ignore[type-arg]
    """(len(rows) + with_abs, C) float64 NumPy: the rows, and a spare last row when `with_abs`;
    None when the tensors are on different devices."""
    devices = {t.device for t in rows}
    if len(devices) != 1:
        return None
    c = int(rows[0].shape[0])
    mat = np.empty((len(rows) + with_abs, c), dtype=np.float64)
    if next(iter(devices)).type == "cpu":
        for i, t in enumerate(rows):
            t = t.detach()
            if t.dtype not in _NUMPY_OK:  # bfloat16, integers: widened by torch (exact)
                t = t.to(F64)
            mat[i] = t.numpy()
        return mat
    try:
        mat[: len(rows)] = torch.stack([t.detach() for t in rows]).to("cpu", F64).numpy()
    except RuntimeError:
        return None
    return mat


def _host_moments(result: LayerResult) -> tuple[np.ndarray, np.ndarray] | None:  # type: ignore[type-arg]
    """The batch mean and variance of every channel as float64 NumPy arrays (host copies)."""
    try:
        bm, bv = batch_moments(result)
    except RuntimeError:
        return None
    return bm.numpy(), bv.numpy()


def _shift_flagged(
    z2: float, r2: float, z_thr: float, std_ratio: float, result: LayerResult
) -> bool:
    """stats_shift could fire, from the largest (μ_B − rm)² / (rv + ε) (z2) and (σ²_B + ε) /
    (rv + ε) (r2) over the channels (asked only where rv + ε ≥ TINY everywhere).

    The check flags a channel when |μ_B − rm| / sd > z_thr or sqrt(max(σ²_B, 0) + ε) / sd >
    std_ratio (sd = sqrt(rv + ε)), among channels with finite numbers and rv > ε. This is asked
    only where every rm and rv is finite and rv > max(ε, 0), so every channel's rv is valid; a
    channel with σ²_B < 0 has a ratio below 1 either way (no clamp needed). The squared ratios
    differ from the check's by a few roundings (relative 1e-15), far inside MARGIN, as long as
    rv + ε is a normal float (else: the check decides); a square that underflows is far below
    any threshold, one that overflows is inf and flags the layer. NaN (non-finite batch
    statistics) fails every `<=` and flags it too: being flagged only costs time.
    """
    if not z2 <= z_thr * z_thr * (1.0 - MARGIN):
        return True
    if result.numel // max(result.info.num_features, 1) < 2:
        return False  # one value per channel: the check has no batch std to compare
    return not r2 <= std_ratio * std_ratio * (1.0 - MARGIN)


__all__ = ["as_vec", "as_vecs", "batch_moments", "suspicious"]
