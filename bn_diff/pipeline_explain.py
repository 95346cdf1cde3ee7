"""Wires `bn-diff explain`: load -> capture (pipeline.run) -> explain one element -> Explanation.

The model runs once through `pipeline.run`, restricted to the chosen layer, with the `Grab`
extension: inside the BN hook, while x and y are alive, it computes the explanation of one element
and keeps only its numbers (the element's x and y, that channel's statistics), never activations.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import load as load_mod
from .capture import BnCall, is_bn_like, named_modules
from .errors import UsageError
from .explain_arith import axis_names, explain_call
from .explain_results import Explanation
from .pipeline import load_inputs, run
from .results import LayerResult


# --- choosing the element ---------------------------------------------------------------------
def parse_index(text: str) -> tuple[int, ...]:
    """ "0,1,2,3" (or "(0, 1, 2, 3)") -> (0, 1, 2, 3)."""
    body = text.strip().strip("()[]")
    try:
        idx = tuple(int(p) for p in body.split(",") if p.strip())
    except ValueError:
        raise UsageError(
            f"--index {text!r} is not a list of integers", "e.g. --index 0,0,0,0"
        ) from None
    if not idx:
        raise UsageError(f"--index {text!r} is empty", "e.g. --index 0,0,0,0")
    return idx


def choose_element(
    shape: tuple[int, ...], channel: int | None, index: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The element to explain; by default the first element of channel 0 (or of `channel`)."""
    n_ch = shape[1]
    if channel is not None and not 0 <= channel < n_ch:
        raise UsageError(
            f"--channel {channel} is out of range: the layer has {n_ch} channels",
            f"use 0 to {n_ch - 1}",
        )
    if index is None:
        if 0 in shape:
            raise UsageError(f"the layer's input {shape} has no elements", "use a non-empty input")
        return (0, channel or 0, *(0 for _ in shape[2:]))
    shown = "(" + ", ".join(str(i) for i in index) + ")"
    if len(index) != len(shape):
        axes = ", ".join(("N", "C", *axis_names(len(shape))[1:]))
        raise UsageError(
            f"--index {shown} has {len(index)} entries, but the layer's input {shape} has "
            f"{len(shape)} axes",
            f"give one per axis ({axes})",
        )
    for ax, (i, s) in enumerate(zip(index, shape, strict=True)):
        if not 0 <= i < s:
            raise UsageError(
                f"--index {shown} is out of range on axis {ax}: the layer's input is {shape}",
                f"axis {ax} takes 0 to {s - 1}",
            )
    if channel is not None and index[1] != channel:
        raise UsageError(
            f"--index {shown} is in channel {index[1]}, but --channel is {channel}",
            "axis 1 of --index is the channel: give one of the two, or make them agree",
        )
    return index


def check_layer_name(model: nn.Module, layer: str) -> None:
    """Refuse a name that is no BN layer of the model (exit 2), suggesting near misses."""
    modules = {n or "(model)": m for n, m in named_modules(model)}
    bns = [n for n, m in modules.items() if is_bn_like(m)]
    base = layer.split("#")[0]
    if base in bns or ":" in layer:  # "block:F.batch_norm" calls are known only once they ran
        return
    if base in modules:
        what = f"is a {type(modules[base]).__name__}, not a BatchNorm layer"
    else:
        what = "is not a layer of the model"
    lower = {n.lower(): n for n in bns}  # "BN1" is as near to "bn1" as "bn1" is
    near = [lower[n] for n in difflib.get_close_matches(base.lower(), lower, n=3, cutoff=0.5)]
    if near:
        hint = "did you mean " + ", ".join(near) + "?"
    elif bns:
        hint = "its BatchNorm layers: " + ", ".join(bns[:6]) + (", ..." if len(bns) > 6 else "")
    else:
        hint = (
            "the model has no BatchNorm modules (F.batch_norm calls are named 'block:F.batch_norm')"
        )
    raise UsageError(f"--layer {layer!r} {what}", hint)


class Grab:
    """`pipeline.Extension` that explains one element of one BN call and keeps only its numbers."""

    def __init__(self, layer: str, channel: int | None, index: tuple[int, ...] | None) -> None:
        self.layer = layer
        self.channel = channel
        self.index = index
        self.result: Explanation | None = None

    def __call__(self, call: BnCall, res: LayerResult) -> LayerResult:
        if call.name == self.layer and self.result is None:
            idx = choose_element(res.info.shape, self.channel, self.index)
            self.result = explain_call(call, res, idx)
        return res


def explain(
    model: nn.Module,
    inputs: Any,
    *,
    layer: str,
    channel: int | None = None,
    index: tuple[int, ...] | None = None,
    mode: str = "as-is",
    model_name: str = "",
    input_name: str = "",
) -> Explanation:
    """Run `model` on `inputs` once and explain one element of BN layer `layer`.

    The element is `index`, or the first element of `channel` (default 0). The model is left as
    found (mode, parameters, buffers, hooks).
    """
    check_layer_name(model, layer)
    base = layer.split("#")[0]
    is_module = ":" not in layer and base != "(model)"
    grab = Grab(layer, channel, index)
    report = run(
        model,
        inputs,
        mode=mode,
        layers=(glob.escape(base),) if is_module else (),
        extensions=(grab,),
        model_name=model_name,
        input_name=input_name,
    )
    if grab.result is None:
        ran = [lr.name for lr in report.layers if lr.name.split("#")[0] == base or not is_module]
        if not ran:
            raise UsageError(
                f"--layer {layer!r} did not run: the model's forward never called it",
                "pick a layer that the forward uses; `bn-diff run` lists the calls that ran",
            )
        near = difflib.get_close_matches(layer, ran, n=3, cutoff=0.5) or ran[:3]
        raise UsageError(
            f"--layer {layer!r} did not run; BatchNorm calls that ran: {len(ran)}",
            "did you mean " + ", ".join(near) + "?",
        )
    return dataclasses.replace(grab.result, model=report.model, input=report.input)


def explain_files(
    model_path: Path,
    input_path: Path | None,
    *,
    layer: str,
    channel: int | None = None,
    index: tuple[int, ...] | None = None,
    mode: str = "as-is",
    input_shape: str | None = None,
    seed: int = 0,
    arch: str | None = None,
    trust: bool = False,
    imports: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
) -> Explanation:
    """`bn-diff explain MODEL INPUT --layer NAME`: load both, then `explain`."""
    net = load_mod.load_model(
        model_path, arch=arch, trust=trust, imports=imports, pythonpath=pythonpath
    )
    inp = load_inputs(input_path, input_shape, seed)
    return explain(
        net,
        inp,
        layer=layer,
        channel=channel,
        index=index,
        mode=mode,
        model_name=str(model_path),
        input_name=inp.source,
    )
