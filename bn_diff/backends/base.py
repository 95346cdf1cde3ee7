"""What every backend hands to `check`: the BatchNorm layers it found in an exported model, the
tensors its runtime produced for them, and the model's final outputs.

Backends only load and run; they never compare. Tensors live here only until `check` has turned
them into numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from bn_diff.results import Finding

ExportKind = Literal["bn", "folded_conv"]

ROOT = "(model)"
"""The name of the model's own forward (ops outside any submodule), as `Capture` labels it."""


@dataclass(slots=True)
class ExportedBn:
    """One BatchNorm as the exported model computes it: a BN node, or a conv holding a folded BN."""

    node: str
    """The node's name in the exported graph."""
    op: str
    """What the node is: "BatchNormalization", "aten._native_batch_norm_legit_no_training.default",
    "aten::batch_norm", or the conv op a BN was folded into ("Conv")."""
    name: str | None
    """Qualified PyTorch module name of the BN ("layer1.0.bn1"); None: the export does not say."""
    kind: ExportKind
    x: torch.Tensor | None
    """The node's input as the runtime produced it (for a folded conv: the conv's input)."""
    y: torch.Tensor
    """The node's output."""
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    eps: float | None = None
    """As stored in the export (ONNX stores a float32)."""
    momentum: float | None = None
    """PyTorch convention: new = (1-momentum)·old + momentum·batch (ONNX stores 1-momentum)."""
    training: bool = False
    """The node normalizes with batch statistics (ONNX training_mode=1, a train-mode aten op)."""
    conv: str | None = None
    """folded_conv: the conv (module name) holding the folded BN; bn: its producer conv if known."""
    source_training: bool | None = None
    """What the exporter recorded about the source op (dynamo metadata): True when the traced
    PyTorch op was a train-mode batch norm; None when unknown."""
    skip_reason: str = ""
    """Non-empty: the backend could not take this node apart; says which check is skipped."""
    matched_by: str = ""
    """How `check` paired it with an eager layer when not by name: "order" (the export records no
    names), "producer" (a conv of an export that does not record folding, taken as the home of the
    BN that follows the same conv in the eager model)."""


@dataclass(slots=True)
class ExportedConv:
    """A conv node of the export (candidate home of a folded BN when the export does not say)."""

    node: str
    name: str | None
    x: torch.Tensor
    y: torch.Tensor


@dataclass(slots=True)
class ExportedRun:
    """An exported model, loaded and run once on the input."""

    path: str
    format: str
    """"onnx", "torch.export" or "torchscript"."""
    exporter: str
    """How it was made, as far as the file tells: "dynamo", "legacy", "" (unknown)."""
    layers: list[ExportedBn]
    outputs: list[torch.Tensor]
    """The model's final outputs, flattened."""
    convs: list[ExportedConv] = field(default_factory=list)
    declares_folding: bool = False
    """The export records which convs hold a folded BN (dynamo metadata); when False a BN that
    has no node of its own may still have been folded into its producer conv."""
    findings: list[Finding] = field(default_factory=list)
    """Backend-level findings: checks that could not be done, and why."""


class KeepBuffers:
    """Restores a module's buffers on exit: a train-mode batch norm in an exported program writes
    its running statistics, and those tensors may be shared with the user's model."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> KeepBuffers:
        with torch.no_grad():
            self.saved = [(b, b.detach().clone()) for _, b in self.module.named_buffers()]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for b, saved in self.saved:
                if not torch.equal(b, saved):
                    b.copy_(saved)
        self.saved = []


def unique_names(layers: list[ExportedBn]) -> None:
    """Give the k-th node of one module the name "name#k", as `Capture` names repeated calls."""
    seen: dict[str, int] = {}
    for e in layers:
        if e.name is None:
            continue
        k = seen.get(e.name, 0) + 1
        seen[e.name] = k
        if k > 1:
            e.name = f"{e.name}#{k}"


_CALL_SUFFIX = re.compile(r"_\d+$")


def canonical(name: str, known: set[str]) -> str:
    """A module name from an export, adjusted to a name the eager model has, when one fits.

    Legacy ONNX scopes append "_1", "_2" to a module called more than once; a functional BN inside
    module M is named "M:F.batch_norm" by `Capture`.
    """
    if name in known:
        return name
    head, _, last = name.rpartition(".")
    stripped = _CALL_SUFFIX.sub("", last)
    cand = f"{head}.{stripped}" if head else stripped
    if cand != name and cand in known:
        return cand
    for n in (name, cand):
        if f"{n}:F.batch_norm" in known:
            return f"{n}:F.batch_norm"
    return name
