"""Health checks of a BN layer's own state: its buffers, parameters and configuration.

Each `check_*` appends `Finding`s to a `Layer` (the call being checked, with its vectors in
float64). The checks that depend on the batch (train mode, frozen BN, stats shift) are in
health_batch.py; `health.layer_findings` runs them all. Messages are plain text (render/ styles
them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import CONV_TYPES, BnCall, is_batchnorm
from .health_screen import FP16_MAX, as_vecs, batch_moments
from .results import Finding, LayerResult, Severity

DEAD_GAMMA = 1e-6
"""|γ_c| at or below this (times the layer's largest |γ| when that is above 1) is a dead channel."""


# --- formatting helpers (plain text; render/ styles it) -------------------------------------------
def fnum(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "0" if x == 0 else f"{x:.4g}"


def chans(idx: Sequence[int], c: int, limit: int = 6) -> str:
    """Channels in words: "channel 3", "all 16 channels", "3 of 16 channels (1, 4, 9)"."""
    n = len(idx)
    if n == 1:
        return f"channel {idx[0]}"
    if n == c:
        return f"all {c} channels"
    shown = ", ".join(str(i) for i in idx[:limit]) + (", …" if n > limit else "")
    return f"{n} of {c} channels ({shown})"


def indices(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten().tolist()]


# --- one layer ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Layer:
    """One BN call being checked; its vectors are made when a check first reads them."""

    call: BnCall
    result: LayerResult
    run_mode: str
    c: int
    findings: list[Finding] = field(default_factory=list)
    vecs_: list[torch.Tensor | None] | None = None
    moments_: tuple[torch.Tensor, torch.Tensor] | None = None

    def vectors(self) -> list[torch.Tensor | None]:
        """rm, rv, gamma, beta before the forward, rm, rv after it (only when the forward writes
        them): float64 CPU (C,) copies, None where absent."""
        if self.vecs_ is None:
            call = self.call
            after = call.updates_running_stats
            self.vecs_ = as_vecs(
                (
                    call.running_mean_before,
                    call.running_var_before,
                    call.weight,
                    call.bias,
                    call.running_mean_after if after else None,
                    call.running_var_after if after else None,
                )
            )
        return self.vecs_

    @property
    def rm(self) -> torch.Tensor | None:
        return self.vectors()[0]

    @property
    def rv(self) -> torch.Tensor | None:
        return self.vectors()[1]

    @property
    def gamma(self) -> torch.Tensor | None:
        return self.vectors()[2]

    @property
    def beta(self) -> torch.Tensor | None:
        return self.vectors()[3]

    @property
    def rm_after(self) -> torch.Tensor | None:
        return self.vectors()[4]

    @property
    def rv_after(self) -> torch.Tensor | None:
        return self.vectors()[5]

    def add(self, id_: str, severity: Severity, message: str, fix: str, **data: Any) -> None:
        self.findings.append(Finding(id_, severity, message, fix, self.call.name, data))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch mean and biased variance per channel (float64 CPU), read once."""
        if self.moments_ is None:
            self.moments_ = batch_moments(self.result)
        return self.moments_

    @property
    def uses_running(self) -> bool:
        return self.result.info.stats == "running"

    @property
    def valid_rv(self) -> torch.Tensor:
        """Channels whose running_var is a usable scale (the others have their own findings)."""
        assert self.rv is not None
        return torch.isfinite(self.rv) & (self.rv > self.call.eps)


def check_nonfinite(lay: Layer) -> None:
    parts: list[str] = []
    data: dict[str, Any] = {}
    for label, v in (
        ("running_mean", lay.rm),
        ("running_var", lay.rv),
        ("weight", lay.gamma),
        ("bias", lay.beta),
    ):
        bad = [] if v is None else indices(~torch.isfinite(v))
        if bad:
            parts.append(f"{label} holds NaN/Inf in {chans(bad, lay.c)}")
            data[label] = bad
    if not parts and lay.call.updates_running_stats:
        for label, v in (("running_mean", lay.rm_after), ("running_var", lay.rv_after)):
            bad = [] if v is None else indices(~torch.isfinite(v))
            if bad:
                parts.append(f"this forward wrote NaN/Inf into {label} in {chans(bad, lay.c)}")
                data[label + "_after"] = bad
    if parts:
        lay.add(
            "nonfinite_stats",
            "error",
            "; ".join(parts) + " — those channels' outputs are NaN or meaningless",
            "reload a good checkpoint or recalibrate (reset_running_stats(), then train-mode "
            "forwards on clean data), and find the batch that brought the NaN/Inf in",
            **data,
        )


def check_nonpositive(lay: Layer) -> None:
    if lay.rv is None:
        return
    bad = indices(torch.isfinite(lay.rv) & (lay.rv <= 0))
    if not bad:
        return
    vals = lay.rv[bad]
    k = bad[int(vals.argmin())]
    eps = lay.call.eps
    if bool((vals + eps <= 0).any()):
        effect = "rv + eps ≤ 0 there, so eval mode outputs NaN"
    else:
        amp = float((1.0 / torch.sqrt(vals + eps)).max())
        effect = (
            "eval mode divides by sqrt(rv + eps) ≤ sqrt(eps) there, amplifying by up to "
            f"{fnum(amp)}×"
        )
    lay.add(
        "nonpositive_running_var",
        "error",
        f"running_var ≤ 0 in {chans(bad, lay.c)} (lowest {fnum(float(lay.rv[k]))} in channel {k}): "
        f"{effect}",
        "a variance cannot be ≤ 0: the checkpoint is corrupt or stores something else in "
        "running_var (a log-variance?); reload it or recalibrate",
        channels=bad,
    )


def check_tiny(lay: Layer) -> None:
    if lay.rv is None:
        return
    eps = lay.call.eps
    bad = indices((lay.rv > 0) & (lay.rv <= eps))
    if not bad:
        return
    vals = lay.rv[bad]
    k = bad[int(vals.argmin())]
    amp = float((1.0 / torch.sqrt(vals + eps)).max())
    bv = float(lay.moments()[1][k])
    lay.add(
        "tiny_running_var",
        "warning",
        f"running_var ≤ eps ({eps:g}) in {chans(bad, lay.c)} (smallest {fnum(float(lay.rv[k]))} "
        f"in channel {k}, whose batch variance here is {fnum(bv)}): eval mode amplifies x − "
        f"running_mean by up to {fnum(amp)}× there, and eps sets the scale as much as the data "
        "does",
        "harmless if those channels are constant in the training data; otherwise recalibrate the "
        "running statistics, and make sure every implementation uses the same eps",
        channels=bad,
        max_amplification=amp,
    )


def check_untrained(lay: Layer) -> bool:
    rm, rv = lay.rm, lay.rv
    nbt = lay.result.info.num_batches_tracked
    if rm is None or rv is None or rm.numel() == 0 or nbt not in (None, 0):
        return False
    if not (bool((rm == 0).all()) and bool((rv == 1).all())):
        return False
    nbt_text = "" if nbt is None else " and num_batches_tracked = 0"
    if lay.uses_running:
        severity: Severity = "error"
        effect = (
            "the statistics were never computed, so this eval-mode output is just γ·x/sqrt(1+ε) + β"
        )
    else:
        severity = "warning"
        effect = (
            "never updated (or reset); this forward uses batch statistics, but eval mode would "
            "compute just γ·x/sqrt(1+ε) + β"
        )
    lay.add(
        "untrained_running_stats",
        severity,
        f"running_mean ≡ 0, running_var ≡ 1{nbt_text}: {effect}",
        "load the trained checkpoint (check load_state_dict's missing keys), or calibrate: a few "
        "train-mode forwards on representative data, then eval()",
    )
    return True


def check_fp16(lay: Layer) -> None:
    if lay.rv is None:
        return
    bad = indices(torch.isfinite(lay.rv) & (lay.rv > FP16_MAX))
    if not bad:
        return
    k = bad[int(lay.rv[bad].argmax())]
    half = lay.result.info.dtype == "float16"
    where = (
        "this float16 layer works only while its statistics stay float32; in float16 they become "
        "inf"
        if half
        else "converted to float16 (model.half(), an fp16 inference engine) they become inf"
    )
    lay.add(
        "fp16_overflow_risk",
        "warning" if half else "info",
        f"running_var exceeds float16's largest value 65504 in {chans(bad, lay.c)} (largest "
        f"{fnum(float(lay.rv[k]))} in channel {k}): {where}, and those channels then output β "
        "whatever the input",
        "keep BatchNorm (or its statistics) in float32, or fold it into the preceding conv before "
        "converting to float16",
        channels=bad,
    )


def check_dead(lay: Layer) -> None:
    g = lay.gamma
    if g is None or g.numel() == 0 or not bool(torch.isfinite(g).all()):
        return
    thr = DEAD_GAMMA * max(1.0, float(g.abs().max()))
    bad = indices(g.abs() <= thr)
    if not bad:
        return
    every = len(bad) == lay.c
    lay.add(
        "dead_channel",
        "warning" if every else "info",
        f"|γ| ≤ {fnum(thr)} in {chans(bad, lay.c)}: those channels output their β whatever the "
        "input" + (" — every channel is dead" if every else ""),
        "check that the trained weights were loaded into this layer"
        if every
        else "harmless (pruned channels); they can be removed with the next layer's inputs",
        channels=bad,
    )


def check_conv_bias(lay: Layer, producer: nn.Module | None) -> None:
    if producer is None or not isinstance(producer, CONV_TYPES):
        return
    bias = getattr(producer, "bias", None)
    if not isinstance(bias, torch.Tensor):
        return
    lay.add(
        "redundant_conv_bias",
        "info",
        f"the conv {lay.call.producer!r} that feeds it has a bias ({bias.numel()} values), which "
        "BN's mean subtraction cancels in train mode and running_mean absorbs in eval mode",
        "build the conv with bias=False (for a trained model, fold it first: "
        "running_mean -= conv.bias)",
        conv=lay.call.producer,
    )


def check_momentum_none(lay: Layer) -> None:
    m = lay.call.module
    if m is None or not is_batchnorm(m) or lay.call.running_mean_before is None:
        return
    if getattr(m, "momentum", 0.1) is not None:
        return
    nbt = lay.result.info.num_batches_tracked
    lay.add(
        "momentum_none",
        "info",
        "momentum=None: the running statistics are the cumulative average of every train-mode "
        f"batch since the last reset (each weighted 1/num_batches_tracked, now {nbt}), not an "
        "exponential moving average",
        "intended for calibration passes; while training, a momentum such as 0.1 follows the "
        "changing weights",
    )
