"""How much one sample's BN output depends on the rest of the batch (for `health`).

In batch-statistics mode each channel is an affine map y = a·x + b whose a, b come from the batch's
mean and variance. Run the same sample with other company and only a, b change: the sample's values
x stay what they are (for this layer; earlier batch-statistics layers add their own share). So the
change of sample 0's output is, per channel, (a'·x + b') − (a·x + b), an affine function of x whose
largest magnitude over the sample's values lies at the sample's min or max. That needs only the
sample's per-channel moments and min/max — one pass over sample 0, no rerun of the model — and it is
exact, not an estimate.

The other company is "alone" (a batch of one) when each sample has at least 2 values per channel
(conv features: N, C, H, W); for BatchNorm1d on (N, C), where a sample alone has no variance and
PyTorch refuses, it is the first half of the batch (at least 2 samples, fewer than N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .capture import BnCall
from .recompute import F64, Moments, as_f64, channel_moments
from .results import LayerResult


@dataclass(frozen=True, slots=True)
class Dependence:
    gap: float
    """Greatest |y_other_batch − y| over sample 0's values, all channels."""
    channel: int
    """Channel where it is greatest."""
    alternative: str
    """The other batch, in words: "alone", "with only the first 4 samples"."""
    samples: int
    """Samples in the other batch (1 = alone)."""

    def to_data(self) -> dict[str, Any]:
        return {
            "sample": 0,
            "batch_dependence": self.gap,
            "batch_dependence_channel": self.channel,
            "other_batch_samples": self.samples,
        }


def _centered(x: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return a * (x - m)


def batch_dependence(call: BnCall, result: LayerResult) -> Dependence | None:
    """Sample 0's output with other company vs in this batch; None when it cannot be measured."""
    x = call.x.detach()
    if x.dim() < 2:
        x = x.reshape(1, -1)
    n = int(x.shape[0])
    c = int(x.shape[1])
    if n < 2 or c == 0 or x.numel() == 0:
        return None
    per_sample = x[0].numel() // c
    if per_sample >= 2:
        k, alternative = 1, "alone"
    else:
        k = max(2, n // 2)
        if k >= n:
            return None
        alternative = f"with only the first {k} samples"
    dev = x.device
    s0 = channel_moments(x[:1])
    other: Moments = s0 if k == 1 else channel_moments(x[:k])
    gamma = as_f64(call.weight, c, 1.0, dev)
    bm = torch.tensor([ch.batch_mean for ch in result.channels], dtype=F64, device=dev)
    bv = torch.tensor([ch.batch_var for ch in result.channels], dtype=F64, device=dev)
    a_batch = gamma / torch.sqrt(bv + call.eps)
    a_other = gamma / torch.sqrt(other.var + call.eps)
    # y' - y = a'(x - m') - a(x - m): beta cancels; evaluated at the sample's extremes
    gaps = torch.maximum(
        (_centered(s0.min, a_other, other.mean) - _centered(s0.min, a_batch, bm)).abs(),
        (_centered(s0.max, a_other, other.mean) - _centered(s0.max, a_batch, bm)).abs(),
    )
    finite = torch.isfinite(gaps)
    if not bool(finite.any()):
        return None
    gaps = gaps.where(finite, torch.full_like(gaps, -1.0))
    ch = int(gaps.argmax())
    return Dependence(gap=float(gaps[ch]), channel=ch, alternative=alternative, samples=k)
