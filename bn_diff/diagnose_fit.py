"""Fitted parameters: eps′, momentum k and scale s, solved from the implied statistics.

The least-squares fit y_ref ≈ a_c·x + b_c inverted with the model's gamma and beta gives implied
statistics s_c = gamma_c/a_c (= sqrt(var + eps)) and m_c = (beta_c - b_c)/a_c. Each parametric
hypothesis is solved from them by (weighted) least squares or a weighted median, then snapped to
the values frameworks actually use; the exact scoring afterwards decides whether it fits.
"""

from __future__ import annotations

import math

import torch

from .diagnose_engine import Candidate
from .diagnose_forms import STATS_WORDS, Layer, formula

EPS_CATALOG: dict[float, str] = {
    1e-3: "the Keras / TensorFlow / MXNet-symbol default",
    1e-4: "",
    2e-5: "Chainer's default",
    1e-5: "PyTorch's default",
    1e-6: "",
    0.0: "older torchvision FrozenBatchNorm2d",
    1e-2: "",
    1e-1: "",
}
MOMENTUM_CATALOG: dict[float, str] = {
    0.1: "PyTorch's momentum: one extra train-mode forward ran first",
    0.01: "",
    0.001: "",
    0.9: "the momentum convention swapped (ONNX/MXNet/Gluon decay 0.9 used as PyTorch momentum)",
    0.99: "the momentum convention swapped (Keras/TF decay 0.99 used as PyTorch momentum)",
    0.999: "the momentum convention swapped (Caffe's 0.999)",
    0.5: "",
}


def implied(layer: Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(implied mean, implied var + eps, usable-channel mask) from the per-channel affine fit."""
    a, b, _ = layer.mom.affine_fit()
    s = layer.gamma / a
    v_hat = s * s
    m_hat = (layer.beta - b) / a
    ok = torch.isfinite(v_hat) & torch.isfinite(m_hat) & (layer.gamma != 0) & (a != 0)
    return m_hat, v_hat, ok


def weighted_median(v: torch.Tensor, w: torch.Tensor) -> float:
    keep = torch.isfinite(v) & torch.isfinite(w) & (w > 0)
    v, w = v[keep], w[keep]
    if v.numel() == 0:
        return float("nan")
    order = torch.argsort(v)
    v, w = v[order], w[order]
    cw = torch.cumsum(w, 0)
    i = int(torch.searchsorted(cw, cw[-1] / 2).item())
    return float(v[min(i, v.numel() - 1)].item())


def _snap(
    value: float, catalog: dict[float, str], rel: float = 0.05, zero: float = 0.0
) -> float | None:
    """The catalogue value within `rel` (relative) of `value`; 0 when |value| <= zero."""
    for c in catalog:
        if (c == 0 and abs(value) <= zero) or (c != 0 and abs(value - c) <= rel * abs(c)):
            return c
    return None


# --- fitted parameters ----------------------------------------------------------------------
def fitted(layer: Layer) -> list[Candidate]:
    """eps′, stats_updated's k and stats_scale_factor's s, solved from the implied statistics."""
    m_hat, v_hat, ok = implied(layer)
    out: list[Candidate] = []
    for which in layer.bases:
        st = layer.stats(which)
        assert st is not None
        out += _eps(layer, which, st, v_hat, ok)
    running = layer.stats("running")
    batch = layer.stats("batch")
    if running is not None:
        out += _scale(layer, running, m_hat, v_hat, ok)
        if batch is not None:
            out += _updated(layer, running, batch, m_hat, v_hat, ok)
    return out


def _eps(
    layer: Layer,
    which: str,
    st: tuple[torch.Tensor, torch.Tensor],
    v_hat: torch.Tensor,
    ok: torch.Tensor,
) -> list[Candidate]:
    mean, var = st
    eps = layer.eps
    est = weighted_median((v_hat - var)[ok], (1 / (var + eps) ** 2)[ok])
    alt = 1e-5 if eps == 1e-3 else 1e-3
    values: list[tuple[float, bool]] = []
    if math.isfinite(est) and abs(est - eps) > 0.05 * max(eps, 1e-12) and est > -float(var.min()):
        snapped = _snap(est, EPS_CATALOG, zero=0.05 * eps)
        if snapped is not None and snapped != eps:
            values.append((snapped, False))
        values.append((alt, True))
        if snapped is None:
            values.append((est, False))
    else:
        values.append((alt, True))
    out = []
    for e, documented in values:
        if bool((var + e <= 0).any().item()):
            continue
        note = EPS_CATALOG.get(e, "")
        out.append(
            Candidate(
                "eps_mismatch",
                formula(mean, var, e, layer.gamma, layer.beta),
                f"The reference uses eps = {e:.4g}{f' ({note})' if note else ''} instead of "
                f"PyTorch's {eps:g}, with {STATS_WORDS[which]}.",
                f"Use eps = {eps:g} in your code, or build the PyTorch layer with eps = {e:.4g} "
                "if the weights come from that framework.",
                params={"eps": e},
                tier=2,
                generalizes=f"E:{which}",
                documented_alt=documented,
            )
        )
    return out


def _scale(
    layer: Layer,
    running: tuple[torch.Tensor, torch.Tensor],
    m_hat: torch.Tensor,
    v_hat: torch.Tensor,
    ok: torch.Tensor,
) -> list[Candidate]:
    """M = rm/s, V = rv/s with one scalar s per layer: least squares for t = 1/s."""
    rm, rv = running
    eps = layer.eps
    w_m = 1 / (rv + eps)
    w_v = 1 / (4 * (rv + eps) ** 2)
    num = (w_m * rm * m_hat + w_v * rv * (v_hat - eps))[ok].sum()
    den = (w_m * rm * rm + w_v * rv * rv)[ok].sum()
    t = float((num / den).item()) if float(den.item()) > 0 else float("nan")
    if not math.isfinite(t) or t <= 0 or abs(t - 1) < 1e-3:
        return []
    s = 1 / t
    return [
        Candidate(
            "stats_scale_factor",
            formula(rm / s, rv / s, eps, layer.gamma, layer.beta),
            f"The reference uses the running statistics divided by one factor s = {s:.6g} (Caffe's "
            "scale-factor blob, or an EMA debias term, applied on one side only).",
            "Divide Caffe's mean/variance blobs by the scale-factor blob when converting (or drop "
            "the debias).",
            params={"scale": s},
            tier=2,
            generalizes="E:running",
        )
    ]


def _updated(
    layer: Layer,
    running: tuple[torch.Tensor, torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    m_hat: torch.Tensor,
    v_hat: torch.Tensor,
    ok: torch.Tensor,
) -> list[Candidate]:
    """M = (1-k)·rm + k·μ_B, V = (1-k)·rv + k·σ²_U: least squares for k, snapped to known values."""
    rm, rv = running
    mu, var = batch
    unb = var * (layer.m / (layer.m - 1))
    eps = layer.eps
    dm, dv = mu - rm, unb - rv
    w_m = 1 / (rv + eps)
    w_v = 1 / (4 * (rv + eps) ** 2)
    num = (w_m * dm * (m_hat - rm) + w_v * dv * (v_hat - eps - rv))[ok].sum()
    den = (w_m * dm * dm + w_v * dv * dv)[ok].sum()
    k = float((num / den).item()) if float(den.item()) > 0 else float("nan")
    if not math.isfinite(k) or abs(k) < 1e-3 or abs(k - 1) < 1e-3 or k > 1.5:
        return []
    catalog = dict(MOMENTUM_CATALOG)
    if layer.nbt is not None:
        catalog.setdefault(1 / (layer.nbt + 1), "momentum=None: the cumulative average's 1/t")
    if layer.momentum is not None:
        catalog.setdefault(
            layer.momentum, "this layer's momentum: one extra train-mode forward ran first"
        )
    snapped = _snap(k, catalog, rel=0.02)
    values = [snapped] if snapped is not None else []
    if snapped != k:
        values.append(k)
    out = []
    for kk in values:
        note = catalog.get(kk, "") if kk == snapped else ""
        mean = (1 - kk) * rm + kk * mu
        var_k = (1 - kk) * rv + kk * unb
        if bool((var_k + eps <= 0).any().item()):
            continue
        out.append(
            Candidate(
                "stats_updated",
                formula(mean, var_k, eps, layer.gamma, layer.beta),
                f"The reference uses running statistics updated by this batch once more, "
                f"(1-k)·running + k·batch with k = {kk:.4g}{f' ({note})' if note else ''}.",
                "Make sure no train-mode forward runs before the comparison; PyTorch's momentum "
                "weighs "
                "the new batch, Keras/TF/ONNX decay weighs the old statistics (k = 1 - decay).",
                params={"momentum": kk},
                tier=2,
                generalizes="E:running",
            )
        )
    return out
