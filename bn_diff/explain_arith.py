"""The worked arithmetic of one element of one BatchNorm call (`bn-diff explain`).

For the learner of DESIGN.md, who printed a BN output and cannot reproduce it by hand: what the
mode means, the channel's statistics, the element's way from x to y, the value the element takes
under the usual misreadings, and what the forward did to the running statistics. The math is
`recompute`'s (float64); the per-channel statistics are `pipeline.check_call`'s, so that explain
and `run` show the same numbers. Nothing here prints; `render/explain.py` does.

`pipeline_explain.explain()` runs a model and calls `explain_call` from inside the BN hook.
"""

from __future__ import annotations

import math

import torch

from .capture import BnCall
from .explain_results import (
    Alternative,
    BufferChange,
    ChannelPart,
    ElementPart,
    Explanation,
    LayerPart,
    SideEffects,
)
from .recompute import F64, Moments, batch_norm_by_hand, reduce_dims, running_update
from .results import LayerResult

AXIS_NAMES = {2: ("N",), 3: ("N", "L"), 4: ("N", "H", "W"), 5: ("N", "D", "H", "W")}
"""How PyTorch's docs name the axes of a BN input other than C, by rank."""

FREEZE: tuple[tuple[str, str], ...] = (
    (
        "bn.eval()  (net.eval() for inference)",
        "normalizes with the running statistics and stops updating them; a later net.train() "
        "switches it back, so call bn.eval() again after it",
    ),
    (
        "bn.weight.requires_grad_(False), bn.bias.requires_grad_(False)",
        "freezes γ and β only: in train mode the layer still normalizes with batch statistics "
        "and still rewrites running_mean and running_var",
    ),
    ("BatchNorm2d(C, affine=False)", "no γ and β at all (γ = 1, β = 0)"),
    (
        "BatchNorm2d(C, track_running_stats=False)",
        "no running statistics: eval mode then also normalizes with the batch's statistics",
    ),
)
"""The ways people try to "freeze" a BN layer, and what each really does."""

CONSTRUCTION_NOTE = (
    "Modules are in train mode after construction (module.training is True): a model used for "
    "inference needs net.eval() first."
)


def axis_names(rank: int) -> tuple[str, ...]:
    """Names of the axes other than C of a rank-`rank` BN input, e.g. ("N", "H", "W")."""
    return AXIS_NAMES.get(rank, ("N", *(f"S{k}" for k in range(1, rank - 1))))


# --- the arithmetic ---------------------------------------------------------------------------
def _vec(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=F64)


def _bn(x: float, mean: float, var: float, gamma: float, beta: float, eps: float) -> float:
    """One element through `recompute.batch_norm_by_hand`, in float64."""
    xt = torch.tensor([[x]], dtype=F64)
    return float(batch_norm_by_hand(xt, _vec(mean), _vec(var), _vec(gamma), _vec(beta), eps))


def _meaning(call: BnCall, res: LayerResult, c: int, m_expr: str, axes: str) -> str:
    info = res.info
    batch = (
        f"this batch's statistics, the mean and the biased variance (÷ m) of channel {c} over "
        f"axes {axes}, i.e. m = {m_expr} values per channel"
    )
    if info.stats == "batch" and info.mode == "train":
        update = (
            "this forward updates them (see below)."
            if call.updates_running_stats
            else "there are none to update (track_running_stats=False)."
        )
        return (
            f"train mode: the output is normalized with {batch}. The running statistics are not "
            f"used for the output; {update}"
        )
    if info.stats == "batch":
        return (
            "eval mode, but the layer has no running statistics (track_running_stats=False), so "
            f"it normalizes with {batch}, as in train mode. Nothing is updated."
        )
    if call.module is not None and not hasattr(call.module, "track_running_stats"):
        return (
            f"{info.type} always normalizes with its stored running_mean and running_var (it has "
            f"no train mode); the batch's statistics (m = {m_expr}) are not used."
        )
    return (
        "eval mode: the output is normalized with the running statistics stored in the layer "
        "(running_mean, running_var, estimated during training); this batch's statistics "
        f"(m = {m_expr} values per channel) are not used, and nothing is updated."
    )


def _printed(call: BnCall) -> str:
    """The layer as PyTorch prints it."""
    if call.module is not None:
        return repr(call.module)
    return f"F.batch_norm(training={call.training}, momentum={call.momentum}, eps={call.eps:g})"


def _layer_part(call: BnCall, res: LayerResult, c: int) -> LayerPart:
    i = res.info
    names = axis_names(len(i.shape))
    sizes = (i.shape[0], *i.shape[2:])
    m = math.prod(sizes)
    m_expr = "·".join(names) + " = "
    m_expr += ("·".join(str(s) for s in sizes) + " = " if len(sizes) > 1 else "") + str(m)
    axes = reduce_dims(len(i.shape))
    axes_text = ", ".join(map(str, axes))
    return LayerPart(
        name=i.name,
        type=i.type,
        printed=_printed(call),
        mode=i.mode,
        stats=i.stats,
        meaning=_meaning(call, res, c, m_expr, axes_text),
        shape=i.shape,
        dtype=i.dtype,
        axes=axes,
        m=m,
        m_expr=m_expr,
        eps=i.eps,
        momentum=i.momentum,
        affine=i.affine,
        track_running_stats=i.track_running_stats,
        weight_frozen=i.weight_frozen,
        producer=i.producer,
    )


def _moments(mean: float, var: float, m: int) -> Moments:
    """One channel's statistics as `recompute.Moments` (min/max are not needed here)."""
    nan = _vec(math.nan)
    return Moments(mean=_vec(mean), var=_vec(var), min=nan, max=nan, count=m)


def _channel_part(res: LayerResult, c: int, m: int) -> ChannelPart:
    ch = res.channels[c]
    gamma = 1.0 if ch.gamma is None else ch.gamma
    beta = 0.0 if ch.beta is None else ch.beta
    if res.info.stats == "running" and ch.running_mean is not None and ch.running_var is not None:
        mean_used, var_used = ch.running_mean, ch.running_var
    else:
        mean_used, var_used = ch.batch_mean, ch.batch_var
    eps = res.info.eps
    return ChannelPart(
        index=c,
        num_channels=len(res.channels),
        batch_mean=ch.batch_mean,
        batch_var=ch.batch_var,
        batch_var_unbiased=float(_moments(ch.batch_mean, ch.batch_var, m).var_unbiased.item()),
        running_mean=ch.running_mean,
        running_var=ch.running_var,
        gamma=gamma,
        beta=beta,
        eps=eps,
        mean_used=mean_used,
        var_used=var_used,
        std_used=math.sqrt(var_used + eps),
    )


def _element_part(
    ch: ChannelPart, res: LayerResult, idx: tuple[int, ...], x: float, y: float
) -> ElementPart:
    centered = x - ch.mean_used
    x_hat = centered / ch.std_used
    y_hand = _bn(x, ch.mean_used, ch.var_used, ch.gamma, ch.beta, ch.eps)
    allowed = res.atol + res.rtol * abs(y_hand) + res.channels[ch.index].tolerance
    return ElementPart(
        index=idx,
        x=x,
        centered=centered,
        x_hat=x_hat,
        scaled=ch.gamma * x_hat,
        y_by_hand=y_hand,
        y_pytorch=y,
        difference=y - y_hand,
        allowed=allowed,
    )


def _alternatives(
    lay: LayerPart, ch: ChannelPart, el: ElementPart, after: tuple[float, float] | None
) -> tuple[Alternative, ...]:
    """The element's value under each common misreading, most frequent first."""
    x, g, b, eps = el.x, ch.gamma, ch.beta, ch.eps
    out: list[Alternative] = []

    def add(id_: str, label: str, formula: str, value: float, note: str = "") -> None:
        d = value - el.y_pytorch
        ties = tuple(a.id for a in out if abs(a.value - value) <= el.allowed)
        out.append(Alternative(id_, label, formula, value, d, abs(d) <= el.allowed, note, ties))

    rm, rv = ch.running_mean, ch.running_var
    used_batch = lay.stats == "batch"
    add("no_normalization", "no normalization: weight and bias only", "γ·x + β", g * x + b)
    if rm is not None and rv is not None and used_batch:
        add(
            "eval_running",
            "eval mode: the running statistics as saved",
            "γ·(x − running_mean)/sqrt(running_var + ε) + β",
            _bn(x, rm, rv, g, b, eps),
            "; ".join(
                n
                for n, on in (
                    ("the other mode", lay.mode == "train"),
                    ("the saved statistics are still the initial 0 and 1", (rm, rv) == (0, 1)),
                )
                if on
            ),
        )
    if after is not None:
        add(
            "eval_running_after",
            "eval mode after this forward: the running statistics it wrote",
            "γ·(x − running_mean′)/sqrt(running_var′ + ε) + β",
            _bn(x, after[0], after[1], g, b, eps),
            "eval() once this batch has updated the buffers",
        )
    add(
        "eval_untrained",
        "eval mode with untrained statistics (running_mean 0, running_var 1)",
        "γ·x/sqrt(1 + ε) + β",
        _bn(x, 0.0, 1.0, g, b, eps),
        "a fresh layer that never saw training data",
    )
    add(
        "unbiased_variance",
        "batch statistics with the unbiased variance (÷ (m − 1))",
        "γ·(x − mean_B)/sqrt(var_U + ε) + β",
        _bn(x, ch.batch_mean, ch.batch_var_unbiased, g, b, eps),
        "torch.var's default; BN normalizes with the biased one",
    )
    alt_eps = 1e-3 if eps != 1e-3 else 1e-5
    who = "Keras/TensorFlow/MXNet's default" if alt_eps == 1e-3 else "PyTorch's default"
    mean_s, var_s = ("mean_B", "var_B") if used_batch else ("running_mean", "running_var")
    add(
        f"eps_{alt_eps:g}",
        f"eps = {alt_eps:g} instead of {eps:g} ({who})",
        f"γ·(x − {mean_s})/sqrt({var_s} + {alt_eps:g}) + β",
        _bn(x, ch.mean_used, ch.var_used, g, b, alt_eps),
    )
    if not used_batch:
        add(
            "train_batch",
            "train mode: this batch's statistics",
            "γ·(x − mean_B)/sqrt(var_B + ε) + β",
            _bn(x, ch.batch_mean, ch.batch_var, g, b, eps),
            "the other mode" if lay.mode == "eval" else "",
        )
    elif rm is None:
        add(
            "eval_same",
            "eval mode: the same as train here",
            "γ·(x − mean_B)/sqrt(var_B + ε) + β",
            el.y_by_hand,
            "no running statistics (track_running_stats=False), so eval uses the batch's too",
        )
    return tuple(out)


def _side_effects(call: BnCall, lay: LayerPart, ch: ChannelPart) -> SideEffects:
    c = ch.index
    changes: list[BufferChange] = []
    notes: list[str] = []
    k: float | None = None
    rm0, rv0 = call.running_mean_before, call.running_var_before
    rm1, rv1 = call.running_mean_after, call.running_var_after
    if call.updates_running_stats and rm0 is not None and rv0 is not None:
        assert rm1 is not None and rv1 is not None
        nb0, nb1 = call.num_batches_tracked_before, call.num_batches_tracked_after
        exp = running_update(
            rm0[c : c + 1],
            rv0[c : c + 1],
            nb0,
            _moments(ch.batch_mean, ch.batch_var, lay.m),
            call.momentum,
        )
        k = exp.momentum_used
        changes.append(
            BufferChange(
                f"running_mean[{c}]",
                float(rm0[c]),
                float(rm1[c]),
                float(exp.mean.item()),
                "(1 − k)·old + k·mean_B",
            )
        )
        changes.append(
            BufferChange(
                f"running_var[{c}]",
                float(rv0[c]),
                float(rv1[c]),
                float(exp.var.item()),
                "(1 − k)·old + k·var_U (unbiased)",
            )
        )
        if nb0 is not None and nb1 is not None:
            changes.append(
                BufferChange("num_batches_tracked", float(nb0), float(nb1), nb0 + 1.0, "old + 1")
            )
        how_k = "momentum" if call.momentum is not None else "1/num_batches_tracked (momentum=None)"
        notes.append(
            f"This train-mode forward rewrote the running statistics (k = {how_k} = {k:g}), "
            "although its output used the batch's. PyTorch does this whether or not weight and "
            "bias require grad: requires_grad only stops gradients."
        )
        if lay.weight_frozen:
            notes.append(
                "Here weight and bias have requires_grad=False, yet the running statistics moved: "
                "the layer is not frozen until eval() is called on it."
            )
    elif lay.stats == "running":
        who = "Eval mode" if lay.mode == "eval" else f"{lay.type} (it has no train mode)"
        notes.append(f"{who}: the running statistics were read, not written.")
    elif lay.mode == "train":
        notes.append("Train mode, but the layer keeps no running statistics: nothing was updated.")
    else:
        notes.append("The layer keeps no running statistics: nothing was updated.")
    return SideEffects(
        updates_running_stats=bool(changes),
        momentum_used=k,
        changes=tuple(changes),
        notes=tuple(notes),
        freeze=FREEZE,
        construction_note=CONSTRUCTION_NOTE,
    )


def explain_call(
    call: BnCall, res: LayerResult, idx: tuple[int, ...], model: str = "", input: str = ""
) -> Explanation:
    """The worked arithmetic of element `idx` of this BN call; `res` is `check_call`'s result.

    Reads only that element of x and y and that channel's running buffers.
    """
    if len(idx) != len(res.info.shape) or len(idx) < 2:
        raise ValueError(f"index {idx} does not fit the BN input {res.info.shape}")
    c = idx[1]
    lay = _layer_part(call, res, c)
    ch = _channel_part(res, c, lay.m)
    x = float(call.x.detach()[idx].item())
    y = float(call.y.detach()[idx].item())
    el = _element_part(ch, res, idx, x, y)
    after: tuple[float, float] | None = None
    rm1, rv1 = call.running_mean_after, call.running_var_after
    if call.updates_running_stats and rm1 is not None and rv1 is not None:
        after = (float(rm1[c]), float(rv1[c]))
    return Explanation(
        model=model,
        input=input,
        layer=lay,
        channel=ch,
        element=el,
        alternatives=_alternatives(lay, ch, el, after),
        side_effects=_side_effects(call, lay, ch),
    )
