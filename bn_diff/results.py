"""Frozen result types passed between the stages, and their JSON form (schema `bn-diff/run/v1`).

Tensors never enter these types: only numbers do. `bool(x)` means "agrees / passed".
JSON keys listed in DESIGN.md are stable; new keys may be added, none renamed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_RUN = "bn-diff/run/v1"

Severity = Literal["info", "warning", "error"]
Mode = Literal["train", "eval"]
StatsUsed = Literal["batch", "running"]

SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


def _num(x: float | None) -> float | None:
    """JSON has no NaN/Inf: encode them as strings would break readers, so use None for NaN."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return 1.7976931348623157e308 if x > 0 else -1.7976931348623157e308
    return x


@dataclass(frozen=True, slots=True)
class Finding:
    """Something worth knowing about a layer or the run that is not an elementwise mismatch."""

    id: str
    """Stable identifier, e.g. "untrained_running_stats"."""
    severity: Severity
    """info, warning or error; `--fail-on` decides which ones fail the run."""
    message: str
    """One sentence: what was seen, with its numbers."""
    fix: str = ""
    """One sentence: what to do about it ("" when nothing needs doing)."""
    layer: str | None = None
    """Qualified name of the layer it concerns; None for run-wide findings."""
    data: dict[str, Any] = field(default_factory=dict, hash=False)
    """The finding's numbers for machines (channels, before/after values...); JSON key `data`.
    Not part of the hash, so that findings stay hashable."""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "severity": self.severity, "message": self.message}
        if self.fix:
            d["fix"] = self.fix
        if self.layer is not None:
            d["layer"] = self.layer
        if self.data:
            d["data"] = _jsonable(self.data)
        return d


def _jsonable(v: Any) -> Any:
    """Numbers through `_num` (no NaN/Inf in JSON), recursively through lists and dicts."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """One explanation of a foreign (reference) output, as ranked by `diagnose`."""

    hypothesis: str
    """Stable id, e.g. "eps_mismatch" (BN_PITFALLS.md / issue list)."""
    max_abs_residual: float
    """max |y_ref - y_hypothesis| over the layer after fitting the hypothesis."""
    explanation: str
    """One sentence saying what the foreign code computed."""
    fix: str = ""
    """One sentence saying how to make it match PyTorch."""
    params: dict[str, float] = field(default_factory=dict)
    """Fitted parameters, e.g. {"eps": 1e-3} or {"momentum": 0.9}."""
    tied_with: tuple[str, ...] = ()
    """Hypotheses the data cannot tell apart from this one."""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "hypothesis": self.hypothesis,
            "max_abs_residual": _num(self.max_abs_residual),
            "explanation": self.explanation,
        }
        if self.fix:
            d["fix"] = self.fix
        if self.params:
            d["params"] = {k: _num(v) for k, v in self.params.items()}
        if self.tied_with:
            d["tied_with"] = list(self.tied_with)
        return d


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """What a BN call was: the module's configuration and how it ran this time."""

    name: str
    """Qualified module name ("layer1.0.bn1"); "#k" is appended for the k-th call of a shared layer."""
    type: str
    """Class name ("BatchNorm2d", "FrozenBatchNorm2d", "F.batch_norm")."""
    mode: Mode
    """The module's `training` flag during the forward."""
    stats: StatsUsed
    """Statistics used to normalize: the batch's, or the running buffers."""
    num_features: int
    """C, the number of channels."""
    eps: float
    momentum: float | None
    """None means cumulative moving average (or not applicable)."""
    affine: bool
    track_running_stats: bool
    producer: str | None = None
    """Name of the conv whose output this BN consumed, if any."""
    dtype: str = "float32"
    """Dtype of the BN output ("float32", "float16", ...)."""
    shape: tuple[int, ...] = ()
    """Shape of the BN input."""
    weight_frozen: bool = False
    """True when weight/bias exist and none requires grad."""
    num_batches_tracked: int | None = None
    """The buffer's value before the forward (None when the module has none)."""


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """Per-channel numbers of one BN call."""

    index: int
    batch_mean: float
    batch_var: float
    """Biased batch variance (divides by m): what train mode normalizes with."""
    running_mean: float | None
    running_var: float | None
    gamma: float | None
    beta: float | None
    max_abs_diff: float
    """Greatest |PyTorch - by-hand| in this channel."""
    mismatched: int
    """Elements of this channel outside tolerance."""
    tolerance: float = 0.0
    """The channel's extra rounding allowance (added to atol); 0 with explicit --atol/--rtol."""
    train_eval_gap: float | None = None
    """Greatest |y_other_mode - y| over this channel's inputs (None: no running statistics)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "batch_mean": _num(self.batch_mean),
            "batch_var": _num(self.batch_var),
            "running_mean": _num(self.running_mean),
            "running_var": _num(self.running_var),
            "gamma": _num(self.gamma),
            "beta": _num(self.beta),
            "max_abs_diff": _num(self.max_abs_diff),
            "mismatched": self.mismatched,
            "rounding_allowance": _num(self.tolerance),
            "train_eval_gap": _num(self.train_eval_gap),
        }


@dataclass(frozen=True, slots=True)
class RunningUpdate:
    """The running-statistics update of a train-mode forward, recomputed and compared."""

    momentum_used: float
    """k in new = (1-k)·old + k·batch (1/num_batches_tracked when momentum is None)."""
    max_abs_diff_mean: float
    max_abs_diff_var: float
    num_batches_tracked_ok: bool
    ok: bool
    largest_mean_change: float
    """Greatest |running_mean after - before| over channels."""
    largest_var_change: float

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "momentum_used": _num(self.momentum_used),
            "max_abs_diff_mean": _num(self.max_abs_diff_mean),
            "max_abs_diff_var": _num(self.max_abs_diff_var),
            "num_batches_tracked_ok": self.num_batches_tracked_ok,
            "ok": self.ok,
            "largest_mean_change": _num(self.largest_mean_change),
            "largest_var_change": _num(self.largest_var_change),
        }


@dataclass(frozen=True, slots=True)
class LayerResult:
    """One BN call checked: configuration, per-channel numbers, totals, findings."""

    info: LayerInfo
    channels: Sequence[ChannelStats]
    """One per channel: a `ChannelTable` (lazy, bn_diff/channel_table.py) from `check_call`, or
    any tuple of them; both compare equal when their contents do."""
    numel: int
    mismatched: int
    """Elements outside atol + rtol·|expected| (+ the channel's rounding allowance)."""
    max_abs_diff: float
    max_abs_index: tuple[int, ...]
    """Index of the greatest absolute difference in the BN output."""
    max_rel_diff: float
    max_rel_index: tuple[int, ...]
    atol: float
    rtol: float
    train_eval_gap: float | None = None
    """Greatest per-channel gap; None when the other mode is not defined."""
    running_update: RunningUpdate | None = None
    findings: tuple[Finding, ...] = ()
    diagnosis: tuple[Hypothesis, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    """Additional JSON keys (stage-specific, e.g. `exported_as`)."""

    def __bool__(self) -> bool:
        return self.mismatched == 0 and (self.running_update is None or bool(self.running_update))

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def min_atol(self) -> float:
        """Smallest atol that passes with rtol = 0 (no rounding allowance)."""
        return self.max_abs_diff

    @property
    def min_rtol(self) -> float:
        """Smallest rtol that passes with atol = 0 (no rounding allowance)."""
        return self.max_rel_diff

    def to_json(self) -> dict[str, Any]:
        i = self.info
        d: dict[str, Any] = {
            "name": i.name,
            "type": i.type,
            "mode": i.mode,
            "stats": i.stats,
            "producer": i.producer,
            "num_features": i.num_features,
            "eps": _num(i.eps),
            "momentum": _num(i.momentum),
            "numel": self.numel,
            "mismatched": self.mismatched,
            "max_abs_diff": _num(self.max_abs_diff),
            "ok": bool(self),
            "channels": [c.to_json() for c in self.channels],
            "findings": [f.to_json() for f in self.findings],
            # extra keys (schema v1 allows additions)
            "affine": i.affine,
            "track_running_stats": i.track_running_stats,
            "dtype": i.dtype,
            "shape": list(i.shape),
            "max_abs_index": list(self.max_abs_index),
            "max_rel_diff": _num(self.max_rel_diff),
            "max_rel_index": list(self.max_rel_index),
            "min_atol": _num(self.min_atol),
            "min_rtol": _num(self.min_rtol),
            "train_eval_gap": _num(self.train_eval_gap),
            "running_update": None
            if self.running_update is None
            else self.running_update.to_json(),
        }
        if self.diagnosis:
            d["diagnosis"] = [h.to_json() for h in self.diagnosis]
        d.update(self.extra)
        return d


@dataclass(frozen=True, slots=True)
class Tolerance:
    """atol and rtol come together or not at all; None means the per-dtype default policy."""

    atol: float | None = None
    rtol: float | None = None
    rounding_k: float = 4.0
    """Multiplier of the per-channel rounding scale used by the default policy."""

    @property
    def explicit(self) -> bool:
        return self.atol is not None


@dataclass(frozen=True, slots=True)
class RunReport:
    """A whole `run`: settings, every BN call checked, run-wide findings."""

    model: str
    input: str
    mode: str
    """The --mode asked for: as-is, train or eval."""
    tolerance: Tolerance
    layers: tuple[LayerResult, ...]
    findings: tuple[Finding, ...] = ()
    device: str = "cpu"
    fail_on: Severity | None = None
    """Findings of this severity or worse fail the run (None: findings never fail it)."""
    reference_ok: bool | None = None
    """With --reference: whether every referenced layer matches PyTorch (None: no reference)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_findings(self) -> tuple[Finding, ...]:
        return self.findings + tuple(f for lr in self.layers for f in lr.findings)

    @property
    def failing_findings(self) -> tuple[Finding, ...]:
        if self.fail_on is None:
            return ()
        floor = SEVERITY_RANK[self.fail_on]
        return tuple(f for f in self.all_findings if SEVERITY_RANK[f.severity] >= floor)

    def __bool__(self) -> bool:
        return (
            all(bool(lr) for lr in self.layers)
            and not self.failing_findings
            and self.reference_ok is not False
        )

    def to_json(self) -> dict[str, Any]:
        """The dict of schema `bn-diff/run/v1`."""
        tol: dict[str, Any]
        if self.tolerance.explicit:
            tol = {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol, "policy": "explicit"}
        else:
            atol, rtol = default_pair(self._dominant_dtype())
            tol = {
                "atol": atol,
                "rtol": rtol,
                "policy": "dtype+rounding",
                "rounding_k": self.tolerance.rounding_k,
            }
        d: dict[str, Any] = {
            "schema": SCHEMA_RUN,
            "ok": bool(self),
            "model": self.model,
            "input": self.input,
            "tolerance": tol,
            "layers": [lr.to_json() for lr in self.layers],
            "findings": [f.to_json() for f in self.findings],
            "mode": self.mode,
            "device": self.device,
        }
        d.update(self.extra)
        return d

    def _dominant_dtype(self) -> str:
        dtypes = [lr.info.dtype for lr in self.layers]
        return max(set(dtypes), key=dtypes.count) if dtypes else "float32"


# torch.testing's per-dtype defaults (rtol, atol), by dtype name, so that the report type stays
# free of torch imports.
DTYPE_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}


def default_pair(dtype: str) -> tuple[float, float]:
    """(atol, rtol) of torch.testing for a dtype name."""
    rtol, atol = DTYPE_TOLERANCES.get(dtype, DTYPE_TOLERANCES["float32"])
    return atol, rtol
