"""Hypotheses that are not one affine map per channel (BN_PITFALLS.md, "Not affine").

Two kinds: *modifiers* of an affine hypothesis (an activation fused after it, float16/bfloat16
arithmetic, a quantization lattice), and *families* with other statistics (per chunk of the batch,
over the wrong axes, along the wrong channel axis). They are only tried when no affine hypothesis
fits, so the group statistics they need cost nothing in the common case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .diagnose_engine import Candidate
from .diagnose_forms import STATS_WORDS, Layer, formula
from .diagnose_predict import ChannelAffine, GroupAffine, Mapped, Sample, SampleAffine
from .recompute import F64, channel_moments, chunks

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ReLU": lambda t: t.clamp_min(0.0),
    "ReLU6": lambda t: t.clamp(0.0, 6.0),
    "LeakyReLU(0.01)": lambda t: F.leaky_relu(t, 0.01),
    "SiLU": F.silu,
    "GELU": F.gelu,
    "GELU(tanh)": lambda t: F.gelu(t, approximate="tanh"),
    "Hardswish": F.hardswish,
}
HALF: dict[torch.dtype, tuple[str, int]] = {
    torch.bfloat16: ("bfloat16", 8),
    torch.float16: ("float16", 11),
}
MAX_GROUPS = 64
"""Ghost batches: at most this many chunks of the batch are tried (2 … 64 devices)."""
MAX_INSTANCE = 1 << 22
"""Per-(sample, channel) statistics are kept only up to this many (sample, channel) pairs."""


def _label(c: Candidate) -> str:
    return "PyTorch's own formula" if c.id == "matches_pytorch" else c.id


def modifiers(bases: Sequence[Candidate], sample: Sample, layer: Layer) -> list[Candidate]:
    """Activation, reduced precision and quantization applied to each affine hypothesis."""
    ymax = float(torch.maximum(layer.mom.ymin.abs(), layer.mom.ymax.abs()).nan_to_num(0.0).max())
    out: list[Candidate] = []
    for name, fn in ACTIVATIONS.items():
        for b in bases:
            out.append(
                Candidate(
                    "fused_activation",
                    Mapped(b.pred, _elementwise(fn)),
                    f"The reference is {name}(BatchNorm) with {_label(b)}: an activation fused "
                    "into the BN output.",
                    f"Compare the BN output before the activation, or apply {name} to PyTorch's "
                    "output too.",
                    params=dict(b.params),
                    tier=3,
                )
            )
    for dtype in _half_dtypes(sample):
        dname, bits = HALF[dtype]
        for b in bases:
            out.append(
                Candidate(
                    "half_precision",
                    b.pred,
                    f"The reference is {_label(b)} computed in {dname}: its error is {dname} "
                    f"rounding (about |y|·2^-{bits}).",
                    "Keep BatchNorm in float32 (autocast does), or compare with a "
                    f"{dname} tolerance (--atol/--rtol).",
                    params={**b.params, "unit_roundoff": 2.0**-bits},
                    tier=3,
                    tol_dtype=dtype,
                    min_residual=0.1 * 2.0**-bits * ymax,
                )
            )
    step = lattice_steps(sample)
    if step is not None:
        lo, hi = layer.mom.ymin, layer.mom.ymax
        q = float(step.max().item())
        for b in bases:
            out.append(
                Candidate(
                    "quantized",
                    Mapped(b.pred, _clamp(lo, hi)),
                    f"The reference is {_label(b)} rounded to a lattice of step {q:.4g} "
                    "(dequant(quant(y)): a quantized output).",
                    f"Compare with the float model, or allow half a step ({q / 2:.3g}) of "
                    "difference.",
                    params={**b.params, "step": q},
                    tier=3,
                    extra_tol=step * 0.5 * (1 + 1e-3),
                )
            )
    return out


def _half_dtypes(s: Sample) -> list[torch.dtype]:
    """The reduced precision the reference's values are stored in (every value representable).

    bfloat16 numbers are float16 numbers too (in float16's range), so bfloat16 is tested first;
    float32 noise is representable in neither.
    """
    v = s.y[torch.isfinite(s.y)]
    if v.numel() == 0 or bool((v == 0).all().item()):
        return []
    for dtype in HALF:
        if bool((v.to(dtype).to(F64) == v).all().item()):
            return [dtype]
    return []


def _elementwise(
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    def apply(t: torch.Tensor, cs: slice) -> torch.Tensor:
        del cs
        return fn(t)

    return apply


def _clamp(lo: torch.Tensor, hi: torch.Tensor) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    def fn(t: torch.Tensor, cs: slice) -> torch.Tensor:
        shape = (1, -1) + (1,) * (t.dim() - 2)
        return torch.minimum(torch.maximum(t, lo[cs].reshape(shape)), hi[cs].reshape(shape))

    return fn


def _step(v: torch.Tensor) -> float | None:
    """The lattice step of 1-D values, or None when they are not on a lattice."""
    u = torch.unique(v[torch.isfinite(v)])
    if u.numel() < 3:
        return 0.0 if u.numel() <= 1 else None
    d = u.diff()
    q = float(d.min().item())
    if q <= 0 or float((u[-1] - u[0]).item()) / q > 65536:
        return None
    for k in range(1, 65):
        r = d / (q / k)
        if float(r.sum().item()) > 65536:
            return None
        if float((r - r.round()).abs().max().item()) <= 1e-3:
            return q / k
    return None


def lattice_steps(s: Sample) -> torch.Tensor | None:
    """(C,) lattice step of the reference (one per tensor or one per channel), from the sample."""
    c = s.y.shape[1]
    if s.y.shape[0] < 8:
        return None
    whole = _step(s.y.reshape(-1))
    if whole is not None and whole > 0:
        return torch.full((c,), whole, dtype=F64, device=s.y.device)
    steps = [_step(s.y[:, i]) for i in range(c)]
    if any(q is None for q in steps) or not any(q for q in steps):
        return None
    return torch.tensor([q or 0.0 for q in steps], dtype=F64, device=s.y.device)


# --- other statistics --------------------------------------------------------------------------
def families(x: torch.Tensor, layer: Layer) -> list[Candidate]:
    return _ghost(x, layer) + _axes(x, layer) + _channel_axis(x, layer)


def _group_sizes(n: int, plane: int) -> list[int]:
    sizes = {g for g in range(1, n) if n % g == 0}
    sizes |= {-(-n // k) for k in range(2, 9)}
    keep = [g for g in sorted(sizes) if 2 <= -(-n // g) <= MAX_GROUPS and g >= 2 and g < n]
    return keep[-10:]


def _ghost(x: torch.Tensor, layer: Layer) -> list[Candidate]:
    n = int(x.shape[0])
    plane = max(1, layer.m // max(n, 1))
    out = []
    for g in _group_sizes(n, plane):
        means, vars_ = [], []
        for g0 in range(0, n, g):
            mo = channel_moments(x[g0 : g0 + g])
            means.append(mo.mean)
            vars_.append(mo.var)
        mean, var = torch.stack(means), torch.stack(vars_)
        a = layer.gamma / torch.sqrt(var + layer.eps)
        k = mean.shape[0]
        out.append(
            Candidate(
                "ghost_batch",
                GroupAffine(a, layer.beta - a * mean, layer.beta, g),
                f"The reference computes batch statistics per chunk of {g} samples ({k} chunks: "
                "ghost "
                f"batch norm, or per-device statistics without SyncBatchNorm), not over all {n}.",
                "Compute the statistics over the whole batch (SyncBatchNorm across devices), or "
                "split PyTorch's batch the same way.",
                params={"group_size": float(g), "groups": float(k)},
                tier=3,
            )
        )
    return out


def sample_moments(
    x: torch.Tensor, keep_instance: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-sample mean and biased var over (C, *S); optionally per-(sample, channel) over S.

    Chunks never split a (sample, channel) plane, so planes are exact; channel blocks of one sample
    are merged with Chan's update.
    """
    n, c = int(x.shape[0]), int(x.shape[1])
    dev = x.device
    cnt = torch.zeros(n, dtype=F64, device=dev)
    mean = torch.zeros(n, dtype=F64, device=dev)
    m2 = torch.zeros(n, dtype=F64, device=dev)
    imean = torch.zeros(n, c, dtype=F64, device=dev) if keep_instance else None
    ivar = torch.zeros(n, c, dtype=F64, device=dev) if keep_instance else None
    for ns, cs in chunks(x.shape):
        xc = x[ns, cs].to(F64)
        flat = xc.reshape(xc.shape[0], xc.shape[1], -1)
        if imean is not None and ivar is not None:
            imean[ns, cs] = flat.mean(dim=2)
            ivar[ns, cs] = flat.var(dim=2, unbiased=False)
        rows = flat.reshape(flat.shape[0], -1)
        nb = rows.shape[1]
        bm = rows.mean(dim=1)
        bm2 = ((rows - bm[:, None]) ** 2).sum(dim=1)
        na = cnt[ns]
        tot = na + nb
        delta = bm - mean[ns]
        mean[ns] += delta * (nb / tot)
        m2[ns] += bm2 + delta * delta * (na * nb / tot)
        cnt[ns] = tot
    return mean, m2 / cnt.clamp_min(1), imean, ivar


def _axes(x: torch.Tensor, layer: Layer) -> list[Candidate]:
    n, c = int(x.shape[0]), int(x.shape[1])
    plane = max(1, layer.m // max(n, 1))
    g, bt, eps = layer.gamma, layer.beta, layer.eps
    fix = "Reduce over every axis except the channel axis (N, H, W for NCHW)."
    keep = plane >= 2 and n * c <= MAX_INSTANCE
    mu, var, imean, ivar = sample_moments(x, keep)
    out = []
    if imean is not None and ivar is not None:
        a = g / torch.sqrt(ivar + eps)
        out.append(
            Candidate(
                "wrong_reduction_axes",
                GroupAffine(a, bt - a * imean, bt, 1),
                "The reference computes statistics per sample and channel over the spatial axes "
                "only (InstanceNorm), not over the batch.",
                fix,
                params={"variant_instance": 1.0},
                tier=3,
            )
        )
    if c * plane >= 2:
        out.append(
            Candidate(
                "wrong_reduction_axes",
                SampleAffine(g, bt, mu, 1 / torch.sqrt(var + eps)),
                "The reference computes statistics per sample over channels and spatial axes "
                "(LayerNorm, or GroupNorm with one group), not per channel over the batch.",
                fix,
                params={"variant_layer": 1.0},
                tier=3,
            )
        )
    mom = layer.mom
    gm = mom.mx.mean()
    gv = (mom.var_x + (mom.mx - gm) ** 2).mean()
    ones = torch.ones_like(g)
    out.append(
        Candidate(
            "wrong_reduction_axes",
            formula(gm * ones, gv * ones, eps, g, bt),
            "The reference computes one mean and variance over the whole tensor (all channels), "
            "not one per channel.",
            fix,
            params={"variant_global": 1.0},
            tier=3,
        )
    )
    return out


def _channel_axis(x: torch.Tensor, layer: Layer) -> list[Candidate]:
    """Parameters (and statistics) broadcast along another axis of size C (channels-last code)."""
    c = int(x.shape[1])
    out = []
    for ax in range(2, x.dim()):
        if int(x.shape[ax]) != c:
            continue
        for which in layer.bases:
            if which == "batch":
                mo = channel_moments(x.movedim(ax, 1))
                mean, var = mo.mean, mo.var
            else:
                st = layer.stats("running")
                assert st is not None
                mean, var = st
            f = formula(mean, var, layer.eps, layer.gamma, layer.beta)
            out.append(
                Candidate(
                    "nhwc_layout",
                    ChannelAffine(f.a, f.b, layer.beta, axis=ax),
                    f"The reference applies the per-channel parameters and {STATS_WORDS[which]} "
                    f"along axis {ax} (size {c}, as channels-last code does) instead of axis 1.",
                    "Transpose to the layout the code expects (NCHW for PyTorch) before "
                    "BatchNorm, or broadcast along the channel axis.",
                    params={"axis": float(ax)},
                    tier=3,
                )
            )
    return out
