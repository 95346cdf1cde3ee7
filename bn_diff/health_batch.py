"""Health checks that depend on the batch: train_mode_layer, no_running_stats,
frozen_bn_updates_stats and stats_shift, and how much one sample's output depends on the batch.

How much one sample's BN output depends on the rest of the batch:

In batch-statistics mode each channel is an affine map y = a·x + b whose a, b come from the batch's
mean and variance. Run the same sample with other company and only a, b change: the sample's values
x stay what they are (for this layer; earlier batch-statistics layers add their own share). So the
change of sample 0's output is, per channel, (a'·x + b') − (a·x + b), an affine function of x whose
largest magnitude over the sample's values lies at the sample's min or max. That needs only the
sample's per-channel moments and min/max — no rerun of the model — and it is exact, not an
estimate. The check's own pass usually has them already (`BnCall.sample0`, from
`fused.SampleSums`); otherwise they take one float64 pass over sample 0 here.

The other company is "alone" (a batch of one) when each sample has at least 2 values per channel
(conv features: N, C, H, W); for BatchNorm1d on (N, C), where a sample alone has no variance and
PyTorch refuses, it is the first half of the batch (at least 2 samples, fewer than N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .capture import BnCall, is_batchnorm
from .health_checks import Layer, chans, fnum, indices
from .health_screen import batch_moments
from .recompute import F64, Moments, Vec, as_f64, channel_moments
from .results import LayerResult, Severity

SHIFT_Z = 3.0
"""stats_shift: |μ_B − rm| / sqrt(rv + ε) above max(SHIFT_Z, SHIFT_Z_ONE / sqrt(N))."""
SHIFT_Z_ONE = 6.0
"""The threshold for a batch of one sample: its mean is one draw, not an average (see README)."""
SHIFT_STD_RATIO = 3.0
"""stats_shift: batch std above this many running stds (the other direction is not flagged: a
ReLU-fed channel is often nearly constant within one batch)."""


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


def _centered(x: Vec, a: Vec, m: Vec) -> Vec:
    out: Vec = a * (x - m)
    return out


def batch_dependence(
    call: BnCall,
    result: LayerResult,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Dependence | None:
    """Sample 0's output with other company vs in this batch; None when it cannot be measured.

    `moments`: the batch's mean and variance per channel (`batch_moments(result)` if not given).
    """
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
    # sample 0's moments from the check's own pass where it had them (call.sample0), else here
    s0 = call.sample0 if call.sample0 is not None else channel_moments(x[:1])
    other: Moments = s0 if k == 1 else channel_moments(x[:k])
    # the rest is arithmetic on (C,) vectors: on the host, in NumPy (one transfer from a GPU),
    # with the operations of the torch formulas in their order and torch's square root
    bm_t, bv_t = batch_moments(result) if moments is None else moments
    rows = [s0.min, s0.max, other.mean, other.var, as_f64(call.weight, c, 1.0, dev)]
    if dev.type != "cpu":  # the roots where the torch formulas took them, in the one transfer
        bv_dev = bv_t.to(dev, F64)
        rows += [torch.sqrt(bv_dev + call.eps), torch.sqrt(other.var + call.eps)]
    stacked = torch.stack(rows)
    lo, hi, m_o, v_o, gamma, *roots = (
        stacked.numpy() if dev.type == "cpu" else stacked.cpu().numpy()
    )
    bm = bm_t.to("cpu", F64).numpy()
    with np.errstate(all="ignore"):
        if roots:
            sd = np.stack(roots)
        else:
            sd = np.stack([bv_t.to("cpu", F64).numpy() + call.eps, v_o + call.eps])
            torch.from_numpy(sd).sqrt_()  # torch's root, in place
        a_batch, a_other = gamma / sd[0], gamma / sd[1]
        # y' - y = a'(x - m') - a(x - m): beta cancels; evaluated at the sample's extremes
        gaps = np.maximum(
            np.abs(_centered(lo, a_other, m_o) - _centered(lo, a_batch, bm)),
            np.abs(_centered(hi, a_other, m_o) - _centered(hi, a_batch, bm)),
        )
    finite = np.isfinite(gaps)
    if not finite.any():
        return None
    gaps = np.where(finite, gaps, -1.0)
    ch = int(np.argmax(gaps))  # the first greatest, as torch's argmax
    return Dependence(gap=float(gaps[ch]), channel=ch, alternative=alternative, samples=k)


def z_threshold(call: BnCall) -> float:
    """stats_shift's z threshold for the call's batch size."""
    n = int(call.x.shape[0]) if call.x.dim() >= 2 else 1
    return max(SHIFT_Z, SHIFT_Z_ONE / math.sqrt(max(n, 1)))


def check_frozen(lay: Layer) -> None:
    call = lay.call
    if not (lay.result.info.weight_frozen and call.updates_running_stats):
        return
    rm0, rv0 = lay.rm, lay.rv
    rm1, rv1 = lay.rm_after, lay.rv_after
    if rm0 is None or rv0 is None or rm1 is None or rv1 is None or rm0.numel() == 0:
        return
    dm, dv = (rm1 - rm0).abs(), (rv1 - rv0).abs()
    if not (bool((dm > 0).any()) or bool((dv > 0).any())):
        return  # momentum 0: the statistics really stay put
    km, kv = int(dm.nan_to_num(nan=math.inf).argmax()), int(dv.nan_to_num(nan=math.inf).argmax())
    n0, n1 = call.num_batches_tracked_before, call.num_batches_tracked_after
    nbt = "" if n0 is None or n1 is None else f", num_batches_tracked {n0} → {n1}"
    lay.add(
        "frozen_bn_updates_stats",
        "warning",
        "weight and bias have requires_grad=False, but the layer is in train mode, so this forward "
        f"still rewrote its running statistics: running_mean[{km}] {fnum(float(rm0[km]))} → "
        f"{fnum(float(rm1[km]))} and running_var[{kv}] {fnum(float(rv0[kv]))} → "
        f"{fnum(float(rv1[kv]))} (the largest changes){nbt}",
        "requires_grad=False freezes only weight and bias: call .eval() on the BN modules to "
        "freeze (again after every model.train()), or replace them with "
        "torchvision.ops.FrozenBatchNorm2d",
        largest_mean_change=float(dm[km]),
        mean_channel=km,
        largest_var_change=float(dv[kv]),
        var_channel=kv,
    )


def _dependence_text(dep: Dependence | None, n: int) -> str:
    if dep is None:
        if n <= 1:
            return "with a batch of 1 the dependence cannot be measured here"
        return f"a batch of {n} single values per channel is too small to measure it"
    return (
        f"sample 0's output would move by up to {fnum(dep.gap)} (channel "
        f"{dep.channel}) if the layer saw it {dep.alternative} instead of in this batch of {n}"
    )


def check_batch_stats(lay: Layer) -> None:
    """train_mode_layer or no_running_stats: the output depends on the rest of the batch."""
    call, info = lay.call, lay.result.info
    if not call.use_batch_stats:
        _stale_buffers(lay)
        return
    n = int(call.x.shape[0]) if call.x.dim() >= 2 else 1
    dep = batch_dependence(call, lay.result, lay.moments())
    data: dict[str, Any] = {} if dep is None else dep.to_data()
    has_buffers = call.running_mean_before is not None and call.running_var_before is not None
    if has_buffers and call.training:
        gap = lay.result.train_eval_gap
        eval_text = "" if gap is None else f"; eval mode would move outputs by up to {fnum(gap)}"
        lay.add(
            "train_mode_layer",
            "warning" if lay.run_mode == "as-is" else "info",
            "in train mode the layer normalizes with this batch's statistics, so each sample's "
            f"output depends on the others: {_dependence_text(dep, n)}{eval_text}",
            "call model.eval() before inference (bn-diff --mode eval checks the model that way)",
            **data,
        )
    elif not has_buffers:
        what = (
            "F.batch_norm is called without running_mean/running_var"
            if info.type == "F.batch_norm"
            else "track_running_stats=False: the layer keeps no running statistics"
        )
        lay.add(
            "no_running_stats",
            "warning",
            f"{what}, so even in eval mode it normalizes with the batch's statistics: "
            f"{_dependence_text(dep, n)}",
            "use track_running_stats=True and calibrate if inference must not depend on the batch "
            "(batch of 1, mixed batches); keep it if batch-dependent output is intended",
            **data,
        )


def _stale_buffers(lay: Layer) -> None:
    m = lay.call.module
    if m is None or not is_batchnorm(m) or bool(getattr(m, "track_running_stats", True)):
        return
    lay.add(
        "no_running_stats",
        "warning",
        "track_running_stats=False but running buffers exist: eval mode normalizes with them, and "
        "train-mode forwards never update them",
        "set track_running_stats=True if the buffers should follow training, or drop the buffers "
        "(running_mean = running_var = None) to always use batch statistics",
    )


def check_shift(lay: Layer) -> None:
    rm, rv = lay.rm, lay.rv
    if rm is None or rv is None or rm.numel() == 0:
        return
    eps = lay.call.eps
    bm, bv = lay.moments()
    ok = lay.valid_rv & torch.isfinite(rm) & torch.isfinite(bm) & torch.isfinite(bv)
    sd = torch.sqrt(rv.clamp(min=0) + eps)
    z = ((bm - rm).abs() / sd).where(ok, torch.zeros_like(sd))
    ratio = (torch.sqrt(bv.clamp(min=0) + eps) / sd).where(ok, torch.zeros_like(sd))
    if lay.result.numel // max(lay.c, 1) < 2:
        ratio = torch.zeros_like(ratio)  # one value per channel: no batch variance to speak of
    z_thr = z_threshold(lay.call)
    score = torch.maximum(z / z_thr, ratio / SHIFT_STD_RATIO)
    bad = indices(score > 1)
    if not bad:
        return
    k = int(score.argmax())
    severity: Severity = "warning" if lay.uses_running else "info"
    lay.add(
        "stats_shift",
        severity,
        f"the batch statistics are far from the running statistics in {chans(bad, lay.c)} "
        f"(worst: channel {k}, batch mean {fnum(float(bm[k]))} vs running mean "
        f"{fnum(float(rm[k]))}, {fnum(float(z[k]))} running std apart; batch std "
        f"{fnum(float(ratio[k]))}× the running std): "
        "the input is unlike the data the statistics came from, or they are stale",
        "check the input's preprocessing against training (0–255 vs 0–1, mean/std normalization, "
        "channel order); if the data really changed, recalibrate the running statistics",
        channels=bad,
        worst_channel=k,
        z=float(z[k]),
        std_ratio=float(ratio[k]),
        z_threshold=z_thr,
    )
