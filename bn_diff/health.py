"""Health findings: what is wrong with a BatchNorm layer itself — no foreign output needed.

A stage beside `diagnose`. It runs inside the capture hook as a pipeline extension, because some
findings need the call's tensors (the buffers before and after the forward, the input x, the
producer conv), and it adds `Finding`s to each `LayerResult`. `pipeline.run` includes it by default.

Severities (what `--fail-on` acts on):
- error: the layer's state is corrupt, or it computes something meaningless right now (NaN/Inf,
  running_var ≤ 0, never-computed statistics used in eval mode).
- warning: probably a bug or fragile: the output depends on the batch, "frozen" statistics move,
  the input is unlike the statistics, eps decides the scale, float16 would overflow.
- info: worth knowing, often intended (pruned channels, a redundant conv bias, momentum=None, a
  train-mode layer when `--mode train` was asked for).
`CATALOG` lists every id with its severity and meaning (the README table is made from it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .capture import CONV_TYPES, BnCall, is_batchnorm, named_modules
from .health_batch import Dependence, batch_dependence
from .results import Finding, LayerResult, Severity

FP16_MAX = 65504.0
"""Largest finite float16."""
DEAD_GAMMA = 1e-6
"""|γ_c| at or below this (times the layer's largest |γ| when that is above 1) is a dead channel."""
SHIFT_Z = 3.0
"""stats_shift: |μ_B − rm| / sqrt(rv + ε) above max(SHIFT_Z, SHIFT_Z_ONE / sqrt(N))."""
SHIFT_Z_ONE = 6.0
"""The threshold for a batch of one sample: its mean is one draw, not an average (see README)."""
SHIFT_STD_RATIO = 3.0
"""stats_shift: batch std above this many running stds (the other direction is not flagged: a
ReLU-fed channel is often nearly constant within one batch)."""


@dataclass(frozen=True, slots=True)
class Kind:
    """One finding id: its severity and what it means (for docs and tests)."""

    id: str
    severity: str
    meaning: str


CATALOG: tuple[Kind, ...] = (
    Kind(
        "nonfinite_stats",
        "error",
        "NaN/Inf in running_mean, running_var, weight or bias (or "
        "written into the running statistics by this forward)",
    ),
    Kind(
        "nonpositive_running_var",
        "error",
        "running_var ≤ 0: eval mode outputs NaN (rv + ε ≤ 0) or divides by less than sqrt(ε)",
    ),
    Kind(
        "untrained_running_stats",
        "error in eval / warning in train",
        "running_mean ≡ 0, running_var ≡ 1, num_batches_tracked = 0: the statistics were never "
        "computed, so eval mode is just γ·x/sqrt(1+ε) + β",
    ),
    Kind(
        "frozen_bn_updates_stats",
        "warning",
        "weight and bias have requires_grad=False but the "
        "layer is in train mode, so the forward still rewrites running_mean/var",
    ),
    Kind(
        "train_mode_layer",
        "warning (info with --mode train)",
        "the layer normalizes with batch "
        "statistics: a sample's output depends on the rest of the batch",
    ),
    Kind(
        "no_running_stats",
        "warning",
        "track_running_stats=False (or F.batch_norm without "
        "buffers): even eval mode normalizes with batch statistics",
    ),
    Kind(
        "stats_shift",
        "warning in eval / info in train",
        "batch statistics far from the running "
        "ones (|μ_B − rm| / sqrt(rv+ε) or batch std / running std large): input unlike the "
        "training data, or stale statistics",
    ),
    Kind(
        "tiny_running_var",
        "warning",
        "0 < running_var ≤ ε: eval mode amplifies by up to "
        "1/sqrt(rv+ε), and ε decides the scale as much as the data",
    ),
    Kind(
        "fp16_overflow_risk",
        "warning for float16 layers / info otherwise",
        "running_var > "
        "65504: as float16 it becomes inf and the channel outputs β whatever the input",
    ),
    Kind(
        "dead_channel",
        "info (warning if every channel)",
        "|γ| ≈ 0: the channel outputs β whatever the input",
    ),
    Kind(
        "redundant_conv_bias",
        "info",
        "the conv feeding BN has a bias, which BN's mean subtraction cancels",
    ),
    Kind(
        "momentum_none",
        "info",
        "momentum=None: running statistics are a cumulative average "
        "of all batches, not an exponential moving average",
    ),
)

STATIC_IDS = frozenset(
    {
        "nonfinite_stats",
        "nonpositive_running_var",
        "tiny_running_var",
        "untrained_running_stats",
        "fp16_overflow_risk",
        "dead_channel",
        "redundant_conv_bias",
        "momentum_none",
        "no_running_stats",
    }
)
"""Findings about a module's state or configuration: reported once per module, not per call."""


# --- formatting helpers (plain text; render/ styles it) -------------------------------------------
def _g(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "0" if x == 0 else f"{x:.4g}"


def _chans(idx: Sequence[int], c: int, limit: int = 6) -> str:
    """Channels in words: "channel 3", "all 16 channels", "3 of 16 channels (1, 4, 9)"."""
    n = len(idx)
    if n == 1:
        return f"channel {idx[0]}"
    if n == c:
        return f"all {c} channels"
    shown = ", ".join(str(i) for i in idx[:limit]) + (", …" if n > limit else "")
    return f"{n} of {c} channels ({shown})"


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(-1).to(torch.float64)


def _where(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten().tolist()]


# --- one layer ------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Layer:
    call: BnCall
    result: LayerResult
    run_mode: str
    c: int
    rm: torch.Tensor | None
    rv: torch.Tensor | None
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    findings: list[Finding]

    def add(self, id_: str, severity: Severity, message: str, fix: str, **data: Any) -> None:
        self.findings.append(Finding(id_, severity, message, fix, self.call.name, data))

    @property
    def uses_running(self) -> bool:
        return self.result.info.stats == "running"

    @property
    def valid_rv(self) -> torch.Tensor:
        """Channels whose running_var is a usable scale (the others have their own findings)."""
        assert self.rv is not None
        return torch.isfinite(self.rv) & (self.rv > self.call.eps)


def layer_findings(
    call: BnCall,
    result: LayerResult,
    run_mode: str = "as-is",
    producer: nn.Module | None = None,
) -> list[Finding]:
    """Every health finding for one BN call (`producer`: the conv module named by call.producer)."""
    lay = _Layer(
        call=call,
        result=result,
        run_mode=run_mode,
        c=result.info.num_features,
        rm=_vec(call.running_mean_before),
        rv=_vec(call.running_var_before),
        gamma=_vec(call.weight),
        beta=_vec(call.bias),
        findings=[],
    )
    _nonfinite(lay)
    _nonpositive(lay)
    _tiny(lay)
    untrained = _untrained(lay)
    _frozen(lay)
    _batch_stats(lay)
    if not untrained:
        _shift(lay)
    _fp16(lay)
    _dead(lay)
    _conv_bias(lay, producer)
    _momentum_none(lay)
    return lay.findings


def _nonfinite(lay: _Layer) -> None:
    parts: list[str] = []
    data: dict[str, Any] = {}
    for label, v in (
        ("running_mean", lay.rm),
        ("running_var", lay.rv),
        ("weight", lay.gamma),
        ("bias", lay.beta),
    ):
        bad = [] if v is None else _where(~torch.isfinite(v))
        if bad:
            parts.append(f"{label} holds NaN/Inf in {_chans(bad, lay.c)}")
            data[label] = bad
    if not parts and lay.call.updates_running_stats:
        for label, t in (
            ("running_mean", lay.call.running_mean_after),
            ("running_var", lay.call.running_var_after),
        ):
            v = _vec(t)
            bad = [] if v is None else _where(~torch.isfinite(v))
            if bad:
                parts.append(f"this forward wrote NaN/Inf into {label} in {_chans(bad, lay.c)}")
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


def _nonpositive(lay: _Layer) -> None:
    if lay.rv is None:
        return
    bad = _where(torch.isfinite(lay.rv) & (lay.rv <= 0))
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
            f"eval mode divides by sqrt(rv + eps) ≤ sqrt(eps) there, amplifying by up to {_g(amp)}×"
        )
    lay.add(
        "nonpositive_running_var",
        "error",
        f"running_var ≤ 0 in {_chans(bad, lay.c)} (lowest {_g(float(lay.rv[k]))} in channel {k}): "
        f"{effect}",
        "a variance cannot be ≤ 0: the checkpoint is corrupt or stores something else in "
        "running_var (a log-variance?); reload it or recalibrate",
        channels=bad,
    )


def _tiny(lay: _Layer) -> None:
    if lay.rv is None:
        return
    eps = lay.call.eps
    bad = _where((lay.rv > 0) & (lay.rv <= eps))
    if not bad:
        return
    vals = lay.rv[bad]
    k = bad[int(vals.argmin())]
    amp = float((1.0 / torch.sqrt(vals + eps)).max())
    bv = lay.result.channels[k].batch_var
    lay.add(
        "tiny_running_var",
        "warning",
        f"running_var ≤ eps ({eps:g}) in {_chans(bad, lay.c)} (smallest {_g(float(lay.rv[k]))} "
        f"in channel {k}, whose batch variance here is {_g(bv)}): eval mode amplifies x − "
        f"running_mean by up to {_g(amp)}× there, and eps sets the scale as much as the data does",
        "harmless if those channels are constant in the training data; otherwise recalibrate the "
        "running statistics, and make sure every implementation uses the same eps",
        channels=bad,
        max_amplification=amp,
    )


def _untrained(lay: _Layer) -> bool:
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


def _frozen(lay: _Layer) -> None:
    call = lay.call
    if not (lay.result.info.weight_frozen and call.updates_running_stats):
        return
    rm0, rv0 = lay.rm, lay.rv
    rm1, rv1 = _vec(call.running_mean_after), _vec(call.running_var_after)
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
        f"still rewrote its running statistics: running_mean[{km}] {_g(float(rm0[km]))} → "
        f"{_g(float(rm1[km]))} and running_var[{kv}] {_g(float(rv0[kv]))} → {_g(float(rv1[kv]))} "
        f"(the largest changes){nbt}",
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
        f"sample 0's output would move by up to {_g(dep.gap)} (channel "
        f"{dep.channel}) if the layer saw it {dep.alternative} instead of in this batch of {n}"
    )


def _batch_stats(lay: _Layer) -> None:
    """train_mode_layer or no_running_stats: the output depends on the rest of the batch."""
    call, info = lay.call, lay.result.info
    if not call.use_batch_stats:
        _stale_buffers(lay)
        return
    n = int(call.x.shape[0]) if call.x.dim() >= 2 else 1
    dep = batch_dependence(call, lay.result)
    data: dict[str, Any] = {} if dep is None else dep.to_data()
    has_buffers = call.running_mean_before is not None and call.running_var_before is not None
    if has_buffers and call.training:
        gap = lay.result.train_eval_gap
        eval_text = "" if gap is None else f"; eval mode would move outputs by up to {_g(gap)}"
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


def _stale_buffers(lay: _Layer) -> None:
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


def _shift(lay: _Layer) -> None:
    rm, rv = lay.rm, lay.rv
    if rm is None or rv is None or rm.numel() == 0:
        return
    chans = lay.result.channels
    eps = lay.call.eps
    bm = torch.tensor([c.batch_mean for c in chans], dtype=torch.float64)
    bv = torch.tensor([c.batch_var for c in chans], dtype=torch.float64)
    n = int(lay.call.x.shape[0]) if lay.call.x.dim() >= 2 else 1
    ok = lay.valid_rv & torch.isfinite(rm) & torch.isfinite(bm) & torch.isfinite(bv)
    sd = torch.sqrt(rv.clamp(min=0) + eps)
    z = ((bm - rm).abs() / sd).where(ok, torch.zeros_like(sd))
    ratio = (torch.sqrt(bv.clamp(min=0) + eps) / sd).where(ok, torch.zeros_like(sd))
    if lay.result.numel // max(lay.c, 1) < 2:
        ratio = torch.zeros_like(ratio)  # one value per channel: no batch variance to speak of
    z_thr = max(SHIFT_Z, SHIFT_Z_ONE / math.sqrt(max(n, 1)))
    score = torch.maximum(z / z_thr, ratio / SHIFT_STD_RATIO)
    bad = _where(score > 1)
    if not bad:
        return
    k = int(score.argmax())
    severity: Severity = "warning" if lay.uses_running else "info"
    lay.add(
        "stats_shift",
        severity,
        f"the batch statistics are far from the running statistics in {_chans(bad, lay.c)} "
        f"(worst: channel {k}, batch mean {_g(float(bm[k]))} vs running mean {_g(float(rm[k]))}, "
        f"{_g(float(z[k]))} running std apart; batch std {_g(float(ratio[k]))}× the running std): "
        "the input is unlike the data the statistics came from, or they are stale",
        "check the input's preprocessing against training (0–255 vs 0–1, mean/std normalization, "
        "channel order); if the data really changed, recalibrate the running statistics",
        channels=bad,
        worst_channel=k,
        z=float(z[k]),
        std_ratio=float(ratio[k]),
        z_threshold=z_thr,
    )


def _fp16(lay: _Layer) -> None:
    if lay.rv is None:
        return
    bad = _where(torch.isfinite(lay.rv) & (lay.rv > FP16_MAX))
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
        f"running_var exceeds float16's largest value 65504 in {_chans(bad, lay.c)} (largest "
        f"{_g(float(lay.rv[k]))} in channel {k}): {where}, and those channels then output β "
        "whatever the input",
        "keep BatchNorm (or its statistics) in float32, or fold it into the preceding conv before "
        "converting to float16",
        channels=bad,
    )


def _dead(lay: _Layer) -> None:
    g = lay.gamma
    if g is None or g.numel() == 0 or not bool(torch.isfinite(g).all()):
        return
    thr = DEAD_GAMMA * max(1.0, float(g.abs().max()))
    bad = _where(g.abs() <= thr)
    if not bad:
        return
    every = len(bad) == lay.c
    lay.add(
        "dead_channel",
        "warning" if every else "info",
        f"|γ| ≤ {_g(thr)} in {_chans(bad, lay.c)}: those channels output their β whatever the input"
        + (" — every channel is dead" if every else ""),
        "check that the trained weights were loaded into this layer"
        if every
        else "harmless (pruned channels); they can be removed with the next layer's inputs",
        channels=bad,
    )


def _conv_bias(lay: _Layer, producer: nn.Module | None) -> None:
    if producer is None or not isinstance(producer, CONV_TYPES):
        return
    bias = getattr(producer, "bias", None)
    if not isinstance(bias, torch.Tensor):
        return
    lay.add(
        "redundant_conv_bias",
        "info",
        f"its input comes from the conv {lay.call.producer!r}, whose bias ({bias.numel()} values) "
        "BN's mean subtraction cancels in train mode and running_mean absorbs in eval mode",
        "build the conv with bias=False (for a trained model, fold it first: "
        "running_mean -= conv.bias)",
        conv=lay.call.producer,
    )


def _momentum_none(lay: _Layer) -> None:
    m = lay.call.module
    if m is None or not is_batchnorm(m) or lay.rm is None:
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


# --- the pipeline extension -------------------------------------------------------------------
class HealthCheck:
    """`pipeline.run`'s extension: `HealthCheck(model, run_mode)(call, result)` adds findings.

    One instance per run: it resolves producer convs by name in `model`, and reports findings about
    a module's state or configuration (STATIC_IDS) once per module, not once per call.
    """

    def __init__(self, model: nn.Module | None = None, run_mode: str = "as-is") -> None:
        self.model = model
        self.run_mode = run_mode
        self._modules: dict[str, nn.Module] | None = None
        self._seen: set[tuple[object, str]] = set()

    def producer(self, call: BnCall) -> nn.Module | None:
        if call.producer is None or self.model is None:
            return None
        if self._modules is None:
            self._modules = {(n or "(model)"): m for n, m in named_modules(self.model)}
        return self._modules.get(call.producer)

    def __call__(self, call: BnCall, result: LayerResult) -> LayerResult:
        found = layer_findings(call, result, self.run_mode, self.producer(call))
        key: object = id(call.module) if call.module is not None else call.name.split("#")[0]
        keep: list[Finding] = []
        for f in found:
            if f.id in STATIC_IDS:
                if (key, f.id) in self._seen:
                    continue
                self._seen.add((key, f.id))
            keep.append(f)
        return replace(result, findings=result.findings + tuple(keep))


__all__ = ["CATALOG", "HealthCheck", "Kind", "layer_findings"]
