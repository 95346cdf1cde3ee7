"""Result types of `bn-diff explain` and their JSON form (schema `bn-diff/explain/v1`).

Numbers and sentences only, no tensors. `bool(explanation)` means "PyTorch's output for the element
agrees with the float64 recompute".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .results import _num

SCHEMA_EXPLAIN = "bn-diff/explain/v1"


@dataclass(frozen=True, slots=True)
class LayerPart:
    """The layer as it ran this time."""

    name: str
    """Qualified name ("layer1.0.bn1"; "#k" for the k-th call of a shared layer)."""
    type: str
    printed: str
    """The layer as PyTorch prints it: `BatchNorm2d(2, eps=1e-05, momentum=0.1, ...)`."""
    mode: str
    """"train" or "eval": the `training` flag during the forward."""
    stats: str
    """"batch" or "running": the statistics the output was normalized with."""
    meaning: str
    """One paragraph: what this mode computes, over which axes, from how many values."""
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[int, ...]
    """Axes the batch statistics reduce over (all but 1)."""
    m: int
    """Values per channel, N·prod(S)."""
    m_expr: str
    """How m comes about, e.g. "N·H·W = 4·8·8 = 256"."""
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    weight_frozen: bool
    """weight/bias exist and none requires grad."""
    producer: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelPart:
    """The chosen channel's numbers (float64, as `run` computes them)."""

    index: int
    num_channels: int
    batch_mean: float
    batch_var: float
    """Biased (÷ m): what train mode normalizes with."""
    batch_var_unbiased: float
    """÷ (m − 1): what running_var accumulates (NaN for m = 1)."""
    running_mean: float | None
    """Before this forward; None when the layer has no running statistics."""
    running_var: float | None
    gamma: float
    """1 when affine=False."""
    beta: float
    """0 when affine=False."""
    eps: float
    mean_used: float
    """The mean the output was normalized with (batch_mean or running_mean)."""
    var_used: float
    std_used: float
    """sqrt(var_used + eps)."""


@dataclass(frozen=True, slots=True)
class ElementPart:
    """One element's way from x to y."""

    index: tuple[int, ...]
    x: float
    centered: float
    """x − mean."""
    x_hat: float
    """(x − mean) / sqrt(var + eps)."""
    scaled: float
    """γ·x̂."""
    y_by_hand: float
    """γ·x̂ + β in float64 (`recompute.batch_norm_by_hand`)."""
    y_pytorch: float
    """What PyTorch returned for this element."""
    difference: float
    """y_pytorch − y_by_hand."""
    allowed: float
    """atol + rtol·|y| + the channel's rounding allowance, as in `run`."""

    def __bool__(self) -> bool:
        return abs(self.difference) <= self.allowed or self.y_pytorch == self.y_by_hand


@dataclass(frozen=True, slots=True)
class Alternative:
    """The value this element takes under one common misreading."""

    id: str
    """Stable id, e.g. "no_normalization", "eval_running", "unbiased_variance"."""
    label: str
    """Short reading, e.g. "γ·x + β: no normalization"."""
    formula: str
    value: float
    difference: float
    """value − PyTorch's output."""
    matches_pytorch: bool
    """Within the element's allowance of PyTorch's output (a tie, not a misreading)."""
    note: str = ""
    tied_with: tuple[str, ...] = ()
    """Ids of the earlier alternatives that give the same value here (within the allowance)."""


@dataclass(frozen=True, slots=True)
class BufferChange:
    """One running buffer of the chosen channel, before and after this forward."""

    name: str
    before: float
    after: float
    """As PyTorch wrote it."""
    expected: float
    """(1 − k)·before + k·batch value, by hand (`recompute.running_update`)."""
    formula: str


@dataclass(frozen=True, slots=True)
class SideEffects:
    """What the forward did to the layer's state."""

    updates_running_stats: bool
    momentum_used: float | None
    """k in new = (1 − k)·old + k·batch (1/num_batches_tracked when momentum is None)."""
    changes: tuple[BufferChange, ...]
    notes: tuple[str, ...]
    freeze: tuple[tuple[str, str], ...]
    """(how, what it does) pairs: the ways to "freeze" a BN layer."""
    construction_note: str


@dataclass(frozen=True, slots=True)
class Explanation:
    """`bn-diff explain`: one element of one BN layer, step by step."""

    model: str
    input: str
    layer: LayerPart
    channel: ChannelPart
    element: ElementPart
    alternatives: tuple[Alternative, ...]
    side_effects: SideEffects

    def __bool__(self) -> bool:
        return bool(self.element)

    def to_json(self) -> dict[str, Any]:
        """The dict of schema `bn-diff/explain/v1`."""
        return {
            "schema": SCHEMA_EXPLAIN,
            "ok": bool(self),
            "model": self.model,
            "input": self.input,
            "layer": _fields(self.layer),
            "channel": _fields(self.channel),
            "element": _fields(self.element),
            "alternatives": [_fields(a) for a in self.alternatives],
            "side_effects": {
                "updates_running_stats": self.side_effects.updates_running_stats,
                "momentum_used": _num(self.side_effects.momentum_used),
                "changes": [_fields(c) for c in self.side_effects.changes],
                "notes": list(self.side_effects.notes),
                "freeze": [{"how": h, "effect": e} for h, e in self.side_effects.freeze],
                "construction_note": self.side_effects.construction_note,
            },
        }


def _fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in obj.__slots__:
        v = getattr(obj, name)
        out[name] = list(v) if isinstance(v, tuple) else _num(v) if isinstance(v, float) else v
    return out
