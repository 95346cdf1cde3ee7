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

Layout: this module (catalog, `layer_findings`, the `HealthCheck` extension) · health_checks.py
(the layer's own state: buffers, parameters, configuration) · health_batch.py (what depends on the
batch: train mode, "frozen" BN, stats shift, and one sample's dependence on the rest of the batch)
· health_screen.py (the cheap first look that lets a healthy layer skip the checks of its vectors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .capture import BnCall, named_modules
from .health_batch import (
    SHIFT_STD_RATIO,
    check_batch_stats,
    check_frozen,
    check_shift,
    z_threshold,
)
from .health_checks import (
    DEAD_GAMMA,
    Layer,
    check_conv_bias,
    check_dead,
    check_fp16,
    check_momentum_none,
    check_nonfinite,
    check_nonpositive,
    check_tiny,
    check_untrained,
)
from .health_screen import suspicious
from .results import Finding, LayerResult


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
        "warning in eval (the first such layer of a forward; later ones info) / info in train",
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


def layer_findings(
    call: BnCall,
    result: LayerResult,
    run_mode: str = "as-is",
    producer: nn.Module | None = None,
    *,
    screen: bool = True,
) -> list[Finding]:
    """Every health finding for one BN call (`producer`: the conv module named by call.producer).

    `screen`: first ask `health_screen.suspicious` whether the checks of the layer's vectors could
    find anything, and skip them when not (the findings are the same; False runs every check).
    """
    lay = Layer(call=call, result=result, run_mode=run_mode, c=result.info.num_features)
    if screen and not suspicious(call, result, z_threshold, SHIFT_STD_RATIO, DEAD_GAMMA):
        # None of the checks of the layer's vectors would find anything. The others, in their
        # order, each behind its own first condition (the check then decides exactly).
        if result.info.weight_frozen and call.updates_running_stats:
            check_frozen(lay)
        if call.use_batch_stats or not call.track_running_stats:
            check_batch_stats(lay)
        if producer is not None:
            check_conv_bias(lay, producer)
        if call.momentum is None:
            check_momentum_none(lay)
        return lay.findings
    check_nonfinite(lay)
    check_nonpositive(lay)
    check_tiny(lay)
    untrained = check_untrained(lay)
    check_frozen(lay)
    check_batch_stats(lay)
    if not untrained:
        check_shift(lay)
    check_fp16(lay)
    check_dead(lay)
    check_conv_bias(lay, producer)
    check_momentum_none(lay)
    return lay.findings


# --- the pipeline extension -------------------------------------------------------------------
class HealthCheck:
    """`pipeline.run`'s extension: `HealthCheck(model, run_mode)(call, result)` adds findings.

    One instance per run: it resolves producer convs by name in `model`, reports findings about
    a module's state or configuration (STATIC_IDS) once per module, not once per call, and keeps
    only the first `stats_shift` warning of the forward: later layers see the shifted activations
    of earlier ones, so their shifts are reported as info, pointing to the first.
    """

    def __init__(self, model: nn.Module | None = None, run_mode: str = "as-is") -> None:
        self.model = model
        self.run_mode = run_mode
        self._modules: dict[str, nn.Module] | None = None
        self._seen: set[tuple[object, str]] = set()
        self._first_shift: str | None = None

    def producer(self, call: BnCall) -> nn.Module | None:
        if call.producer is None or self.model is None:
            return None
        if self._modules is None:
            self._modules = {(n or "(model)"): m for n, m in named_modules(self.model)}
        return self._modules.get(call.producer)

    def __call__(self, call: BnCall, result: LayerResult) -> LayerResult:
        found = layer_findings(call, result, self.run_mode, self.producer(call))
        if not found:
            return result
        key: object = id(call.module) if call.module is not None else call.name.split("#")[0]
        keep: list[Finding] = []
        for f in found:
            if f.id in STATIC_IDS:
                if (key, f.id) in self._seen:
                    continue
                self._seen.add((key, f.id))
            if f.id == "stats_shift" and f.severity == "warning":
                if self._first_shift is None:
                    self._first_shift = call.name
                else:
                    f = replace(
                        f,
                        severity="info",
                        message=f"{f.message}; the shift already shows at {self._first_shift}, "
                        "earlier in this forward, which probably explains this one",
                    )
            keep.append(f)
        return replace(result, findings=result.findings + tuple(keep))


__all__ = ["CATALOG", "HealthCheck", "Kind", "layer_findings"]
