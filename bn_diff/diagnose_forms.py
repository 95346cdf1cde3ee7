"""Affine hypotheses without parameters: the closed forms of BN_PITFALLS.md.

Nearly every foreign BN mistake is still y = a_c·x + b_c per channel: each closed form here is such
an (a_c, b_c) built from the layer's own numbers (batch or running statistics, gamma, beta, eps).
Parametric ones (eps′, momentum k, scale s) live in diagnose_fit.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .diagnose_engine import Candidate, CoMoments
from .diagnose_predict import ChannelAffine, Direct, Predictor

STATS_WORDS = {"batch": "batch statistics", "running": "running statistics"}
FIX_INFERENCE = (
    "Put the layer in the same mode on both sides: model.eval() (training=False) for inference, "
    "or --mode train if train mode is what you compare."
)


@dataclass(frozen=True)
class Layer:
    """A BN call as diagnosis sees it: float64 (C,) parameters, its moments, PyTorch's choice."""

    gamma: torch.Tensor
    beta: torch.Tensor
    affine: bool
    rm: torch.Tensor | None
    rv: torch.Tensor | None
    eps: float
    momentum: float | None
    nbt: int | None
    pt_stats: str
    """"batch" or "running": what PyTorch normalized with."""
    mom: CoMoments
    shape: tuple[int, ...]

    @property
    def m(self) -> int:
        return self.mom.count

    @property
    def at_init(self) -> bool:
        """running_mean ≡ 0 and running_var ≡ 1: the buffers were never trained or loaded."""
        if self.rm is None or self.rv is None:
            return False
        return bool((self.rm == 0).all().item() and (self.rv == 1).all().item())

    def stats(self, which: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if which == "batch":
            return (self.mom.mx, self.mom.var_x) if self.m >= 2 else None
        if self.rm is None or self.rv is None:
            return None
        return self.rm, self.rv

    @property
    def bases(self) -> list[str]:
        """Statistics the foreign code may have used: PyTorch's first, then the other kind."""
        other = "running" if self.pt_stats == "batch" else "batch"
        return [w for w in (self.pt_stats, other) if self.stats(w) is not None]


def formula(
    mean: torch.Tensor, var: torch.Tensor, eps: float, gamma: torch.Tensor, beta: torch.Tensor
) -> ChannelAffine:
    """gamma·(x - mean)/sqrt(var + eps) + beta as y = A·x + B."""
    a = gamma / torch.sqrt(var + eps)
    return ChannelAffine(a, beta - a * mean, beta)


def scaled(a: torch.Tensor, mean: torch.Tensor, beta: torch.Tensor) -> ChannelAffine:
    """A given scale a and centre mean: y = a·(x - mean) + beta."""
    return ChannelAffine(a, beta - a * mean, beta)


def plain(layer: Layer, y_torch: torch.Tensor | None) -> list[Candidate]:
    """Parameter-free closed forms, PyTorch's own output first."""
    g, bt, eps = layer.gamma, layer.beta, layer.eps
    out: list[Candidate] = []
    pt = layer.stats(layer.pt_stats)
    if pt is not None:
        f = formula(pt[0], pt[1], eps, g, bt)
        pred: Predictor = f if y_torch is None else Direct(y_torch, f)
        if layer.pt_stats == "batch":
            what = (
                "train-mode BatchNorm with the batch's mean and biased variance (the same formula "
                "as track_running_stats=False, or a 'frozen' BN left in train mode)"
            )
        else:
            what = "eval-mode BatchNorm with the running statistics"
        out.append(
            Candidate(
                "matches_pytorch",
                pred,
                f"The reference equals PyTorch's output: {what}.",
                tier=0,
                key=f"E:{layer.pt_stats}",
            )
        )
    if layer.m == 1:
        zero = torch.zeros_like(g)
        out.append(
            Candidate(
                "batch_size_1",
                ChannelAffine(zero, bt.clone(), bt),
                "The reference is exactly beta: train-mode BatchNorm over one value per channel "
                "makes "
                "x - mean = 0 (PyTorch refuses this case), so your code ran in train mode on a "
                "batch of one.",
                "Use eval mode (running statistics) for single-sample inference.",
            )
        )
    batch = layer.stats("batch")
    if batch is not None:
        mean, var = batch
        out.append(
            Candidate(
                "train_batch_stats",
                formula(mean, var, eps, g, bt),
                "The reference normalizes with the batch's own mean and biased variance (train "
                "mode, the same "
                "formula as track_running_stats=False or a 'frozen' BN left in train mode), while "
                "PyTorch used the running statistics.",
                FIX_INFERENCE,
                key="E:batch",
            )
        )
        unb = var * (layer.m / (layer.m - 1))
        out.append(
            Candidate(
                "unbiased_var",
                formula(mean, unb, eps, g, bt),
                "The reference normalizes with the unbiased batch variance (divides by m-1 = "
                f"{layer.m - 1}); "
                "PyTorch normalizes with the biased one (divides by m) and keeps the unbiased one "
                "for running_var only.",
                "Divide by m when computing the variance used to normalize (unbiased=False, "
                "ddof=0).",
            )
        )
    running = layer.stats("running")
    if running is not None and not layer.at_init:
        rm, rv = running
        out.append(
            Candidate(
                "eval_running_stats",
                formula(rm, rv, eps, g, bt),
                "The reference normalizes with the running statistics (eval mode), while PyTorch "
                "ran this layer in train mode with the batch's statistics.",
                FIX_INFERENCE,
                key="E:running",
            )
        )
    out += _untrained(layer)
    if running is not None:
        out += _buffer_mixups(layer, *running)
    out += _param_mixups(layer)
    return out


def _untrained(layer: Layer) -> list[Candidate]:
    g, bt, eps = layer.gamma, layer.beta, layer.eps
    zero, one = torch.zeros_like(g), torch.ones_like(g)
    nbt = "" if layer.nbt is None else f", num_batches_tracked = {layer.nbt}"
    if layer.at_init:
        untrained = (
            "The reference is eval-mode BatchNorm with this model's running statistics, which are "
            "still "
            f"at their initial values (running_mean = 0, running_var = 1{nbt}): the layer was "
            "never trained or calibrated, so eval mode only scales x by gamma/sqrt(1 + eps)."
        )
        untrained_fix = (
            "Load the trained running_mean/running_var, or calibrate them with a few train-mode "
            "forwards on real data, before relying on eval mode."
        )
        affine = (
            "The reference is just gamma·x + beta per channel (no normalization), which is also "
            "what "
            "eval mode gives up to 1/sqrt(1 + eps) because this model's running statistics are "
            "still at their initial values (mean 0, var 1)."
        )
    else:
        untrained = (
            "The reference normalizes with running statistics at their initial values (mean 0, "
            "var 1) "
            "instead of the model's trained buffers: running_mean/running_var were not loaded."
        )
        untrained_fix = (
            "Load running_mean and running_var from the checkpoint too (they are buffers)."
        )
        affine = (
            "The reference is just gamma·x + beta per channel: the normalization step is missing."
        )
    key = "E:running" if layer.at_init else ""
    affine_fix = "Normalize first: gamma·(x - mean)/sqrt(var + eps) + beta."
    if layer.at_init and layer.pt_stats == "batch":
        affine_fix = (
            "PyTorch ran this layer in train mode, normalizing with the batch's mean and "
            "variance: do the same, or use eval mode on both sides once the running "
            "statistics are trained."
        )
    return [
        Candidate(
            "eval_untrained_stats",
            formula(zero, one, eps, g, bt),
            untrained,
            untrained_fix,
            key=key,
        ),
        Candidate("affine_only", ChannelAffine(g.clone(), bt.clone(), bt), affine, affine_fix),
    ]


def _buffer_mixups(layer: Layer, rm: torch.Tensor, rv: torch.Tensor) -> list[Candidate]:
    g, bt, eps = layer.gamma, layer.beta, layer.eps
    amp = 1 / math.sqrt(eps) if eps > 0 else float("inf")
    return [
        Candidate(
            "zero_running_var",
            formula(rm, torch.zeros_like(rv), eps, g, bt),
            f"The reference divides by sqrt(0 + eps): running_var was left at zero, which "
            f"amplifies the output by up to {amp:.0f}x.",
            "Load running_var (an unset variance buffer must start at 1, not 0).",
        ),
        Candidate(
            "missing_sqrt",
            scaled(g / (rv + eps), rm, bt),
            "The reference divides by running_var + eps instead of sqrt(running_var + eps).",
            "Take the square root of var + eps.",
        ),
        Candidate(
            "std_as_var",
            formula(rm, torch.sqrt(rv.clamp_min(0)), eps, g, bt),
            "The reference divides by sqrt(sqrt(running_var) + eps): a standard deviation was "
            "stored where the variance is expected (a double square root).",
            "Store the variance (std²) in running_var, or drop the extra square root.",
        ),
        Candidate(
            "inv_std_buffer",
            scaled(g * rv, rm, bt),
            "The reference multiplies by running_var as if the buffer held 1/sqrt(var + eps) "
            "(an inverse-std buffer).",
            "Convert with 1/sqrt(running_var + eps) before using it as a multiplier.",
        ),
    ]


def _param_mixups(layer: Layer) -> list[Candidate]:
    g, bt, eps = layer.gamma, layer.beta, layer.eps
    out: list[Candidate] = []
    one, zero = torch.ones_like(g), torch.zeros_like(g)
    for which in layer.bases:
        st = layer.stats(which)
        assert st is not None
        mean, var = st
        words = STATS_WORDS[which]
        if layer.affine:
            out.append(
                Candidate(
                    "gamma_ignored",
                    formula(mean, var, eps, one, bt),
                    f"The reference ignores gamma (uses 1, as MXNet's fix_gamma=True default "
                    f"does), with {words}.",
                    "Apply the weight gamma (fix_gamma=False).",
                )
            )
            out.append(
                Candidate(
                    "beta_ignored",
                    formula(mean, var, eps, g, zero),
                    f"The reference leaves out beta (the bias), with {words}.",
                    "Add beta after scaling.",
                )
            )
            out.append(
                Candidate(
                    "no_affine",
                    formula(mean, var, eps, one, zero),
                    f"The reference normalizes but applies neither gamma nor beta, with {words}.",
                    "Apply gamma and beta (or build the layer with affine=False if the "
                    "weights have none).",
                )
            )
    out += _permutations(layer)
    return out


SLOTS = ("weight", "bias", "running_mean", "running_var")


def _permutations(layer: Layer) -> list[Candidate]:
    """Parameters loaded into the wrong slots: every reassignment of weight/bias/mean/var."""
    eps = layer.eps
    out: list[Candidate] = []
    fix = "Load parameters and buffers by name, not by position."
    running = layer.stats("running")
    if running is not None:
        vals = dict(zip(SLOTS, (layer.gamma, layer.beta, *running), strict=True))
        movable = SLOTS if layer.affine else SLOTS[2:]
        for perm in itertools.permutations(movable):
            mapping = dict(zip(movable, perm, strict=True))
            if all(k == v for k, v in mapping.items()):
                continue
            src = {k: mapping.get(k, k) for k in SLOTS}
            g, b, mean, var = (vals[src[k]] for k in SLOTS)
            # a negative 'variance' gives NaN channels: foreign code would produce them too
            moved = ", ".join(f"{k} ← {src[k]}" for k in SLOTS if src[k] != k)
            out.append(
                Candidate(
                    "params_permuted",
                    formula(mean, var, eps, g, b),
                    f"The reference used parameters from the wrong slots ({moved}), with "
                    "running statistics.",
                    fix,
                )
            )
    batch = layer.stats("batch")
    if batch is not None and layer.affine:
        out.append(
            Candidate(
                "params_permuted",
                formula(*batch, eps, layer.beta, layer.gamma),
                "The reference used parameters from the wrong slots (weight ← bias, "
                "bias ← weight), with batch statistics.",
                fix,
            )
        )
    return out
