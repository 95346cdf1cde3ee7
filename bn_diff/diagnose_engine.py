"""The machinery under `diagnose`: one moments pass, a small sample, predictors, screening, scoring.

Every hypothesis is a *predictor* of the reference output. Scoring one exactly needs a pass over the
whole layer, so hypotheses are first screened on a fixed sample of positions (a lower bound of the
true residual: a hypothesis that fails there fails everywhere), and only survivors get the exact,
chunked float64 pass. Nothing here materialises a float64 copy of a whole activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .diagnose_predict import ChannelAffine, Direct, Predictor, Sample
from .recompute import F64, _bcast, chunks, reduce_dims
from .results import Tolerance, default_pair

ROUNDING_K = 4.0
"""Multiplier of eps_dtype·(per-channel scale) allowed for honest rounding in the foreign code."""


# --- pass 1: per-channel co-moments of (x, y_ref) ----------------------------------------------
@dataclass(frozen=True, slots=True)
class CoMoments:
    """Per-channel means and centered co-moments of x and y_ref (float64, shape (C,))."""

    count: int
    """m, values per channel."""
    mx: torch.Tensor
    my: torch.Tensor
    cxx: torch.Tensor
    """Σ(x - x̄)²."""
    cxy: torch.Tensor
    cyy: torch.Tensor
    xmin: torch.Tensor
    xmax: torch.Tensor
    ymin: torch.Tensor
    ymax: torch.Tensor
    nonfinite_x: int
    nonfinite_y: int
    torch_diff: torch.Tensor | None = None
    """(C,) max |y_ref - y_torch| (PyTorch's own output), when that was given."""
    torch_excess: torch.Tensor | None = None
    """(C,) max (|y_ref - y_torch| - rtol·|y_ref|): with atol + allowance, the exact fit test."""

    @property
    def var_x(self) -> torch.Tensor:
        """Biased batch variance of x."""
        return self.cxx / max(self.count, 1)

    @property
    def xabs(self) -> torch.Tensor:
        return torch.maximum(self.xmin.abs(), self.xmax.abs())

    def affine_fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, rms) of the least-squares fit y_ref ≈ a·x + b per channel.

        a is NaN where x is constant (nothing to fit).
        """
        a = self.cxy / self.cxx
        a = torch.where(self.cxx > 0, a, torch.full_like(a, float("nan")))
        b = self.my - a * self.mx
        rss = (self.cyy - a * self.cxy).clamp_min(0.0)
        return a, b, torch.sqrt(rss / max(self.count, 1))


def co_moments(
    x: torch.Tensor, y: torch.Tensor, y_torch: torch.Tensor | None = None, rtol: float = 0.0
) -> CoMoments:
    """One chunked float64 pass; chunks merged with Chan's update (as exact as two passes).

    With PyTorch's own output it also measures |y_ref - y_torch| per channel in the same pass, so
    that a reference which matches PyTorch costs one pass in all.
    """
    c = int(x.shape[1])
    dev = x.device
    z = torch.zeros(c, dtype=F64, device=dev)
    n = z.clone()
    mx, my, cxx, cxy, cyy = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()
    inf = torch.full((c,), float("inf"), dtype=F64, device=dev)
    xmin, xmax, ymin, ymax = inf.clone(), -inf, inf.clone(), -inf.clone()
    tdiff = None if y_torch is None else z.clone()
    texcess = None if y_torch is None else -inf.clone()
    bad_x = bad_y = 0
    dims = reduce_dims(x.dim())
    for ns, cs in chunks(x.shape):
        xc = x[ns, cs].to(F64)
        yc = y[ns, cs].to(F64)
        nb = xc.numel() // max(xc.shape[1], 1)
        if nb == 0:
            continue
        bx = xc.mean(dim=dims)
        by = yc.mean(dim=dims)
        # a NaN/Inf makes its channel's mean non-finite: count only then
        if not bool(torch.isfinite(bx).all().item()):
            bad_x += int((~torch.isfinite(xc)).sum().item())
        if not bool(torch.isfinite(by).all().item()):
            bad_y += int((~torch.isfinite(yc)).sum().item())
        dx = xc - _bcast(bx, xc.dim())
        dy = yc - _bcast(by, yc.dim())
        bxx, bxy, byy = (dx * dx).sum(dim=dims), (dx * dy).sum(dim=dims), (dy * dy).sum(dim=dims)
        na = n[cs]
        tot = na + nb
        ex, ey = bx - mx[cs], by - my[cs]
        w = na * nb / tot
        cxx[cs] += bxx + ex * ex * w
        cxy[cs] += bxy + ex * ey * w
        cyy[cs] += byy + ey * ey * w
        mx[cs] += ex * (nb / tot)
        my[cs] += ey * (nb / tot)
        n[cs] = tot
        xmin[cs] = torch.minimum(xmin[cs], xc.amin(dim=dims))
        xmax[cs] = torch.maximum(xmax[cs], xc.amax(dim=dims))
        ymin[cs] = torch.minimum(ymin[cs], yc.amin(dim=dims))
        ymax[cs] = torch.maximum(ymax[cs], yc.amax(dim=dims))
        if y_torch is not None and tdiff is not None and texcess is not None:
            tc = y_torch[ns, cs].to(F64)
            d = (yc - tc).abs()
            d = torch.where((yc == tc) | (yc.isnan() & tc.isnan()), torch.zeros_like(d), d)
            d = d.nan_to_num(nan=float("inf"))
            tdiff[cs] = torch.maximum(tdiff[cs], d.amax(dim=dims))
            excess = (d - rtol * yc.abs().nan_to_num(nan=0.0, posinf=0.0)).amax(dim=dims)
            texcess[cs] = torch.maximum(texcess[cs], excess)
    m = x.numel() // max(c, 1)
    return CoMoments(m, mx, my, cxx, cxy, cyy, xmin, xmax, ymin, ymax, bad_x, bad_y, tdiff, texcess)


# --- candidates and their scores -----------------------------------------------------------------
@dataclass(eq=False)
class Candidate:
    """One hypothesis with its prediction and the words that go with it."""

    id: str
    pred: Predictor
    explanation: str
    fix: str = ""
    params: dict[str, float] = field(default_factory=dict)
    tier: int = 1
    """0 PyTorch itself, 1 closed form, 2 fitted parameter, 3 non-affine family / modifier."""
    key: str = ""
    """"E:batch" / "E:running" for the plain formulas that parametric hypotheses generalise."""
    generalizes: str = ""
    """The key of the plain formula this one reduces to at its degenerate parameter value."""
    documented_alt: bool = False
    """A documented alternative value (kept as a tie even when the plain formula fits)."""
    tol_dtype: torch.dtype | None = None
    """Judge with this dtype's tolerance (half_precision) instead of the reference's."""
    extra_tol: torch.Tensor | None = None
    """(C,) added to the tolerance (quantized: half a lattice step)."""
    min_residual: float = 0.0
    """Fits only if its residual is at least this large (half_precision: errors of that size)."""
    exact_fit: bool | None = None
    """Set when the fit test was done exactly some other way (matches_pytorch, in pass 1)."""
    sample_score: float = float("inf")
    score: float = float("inf")
    """max |y_ref - y_hyp| / tolerance over the layer; <= 1 means it fits."""
    residual: float = float("inf")
    """max |y_ref - y_hyp|."""

    @property
    def coef(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self.pred.formula if isinstance(self.pred, Direct) else self.pred
        if isinstance(p, ChannelAffine) and p.axis == 1 and self.tol_dtype is None:
            return p.a, p.b
        return None

    @property
    def fits(self) -> bool:
        if self.exact_fit is not None:
            return self.exact_fit
        return self.score <= 1.0 and self.residual >= self.min_residual


@dataclass(frozen=True, slots=True)
class Judge:
    """How close is close enough: the tolerance policy for one layer."""

    tol: Tolerance
    dtype: torch.dtype
    """The coarser of the input's and the reference's dtype."""
    xabs: torch.Tensor
    """(C,) max |x| per channel."""

    def limits(self, c: Candidate) -> tuple[float, float, torch.Tensor]:
        """(atol, rtol, (C,) allowance) for candidate c."""
        dtype = c.tol_dtype or self.dtype
        if self.tol.explicit and c.tol_dtype is None:
            assert self.tol.atol is not None and self.tol.rtol is not None
            allow = torch.zeros_like(self.xabs)
            atol, rtol = self.tol.atol, self.tol.rtol
        else:
            atol, rtol = default_pair(str(dtype).removeprefix("torch."))
            eps = torch.finfo(dtype).eps
            allow = ROUNDING_K * eps * c.pred.scale(self.xabs)
            allow = torch.nan_to_num(allow, nan=0.0, posinf=0.0, neginf=0.0)
        if c.extra_tol is not None:
            allow = allow + c.extra_tol
        return atol, rtol, allow


def score_direct(c: Candidate, mom: CoMoments, judge: Judge) -> None:
    """matches_pytorch with PyTorch's own output: exact from pass 1's per-channel maxima.

    |d| <= atol + rtol·|y| + allow_c for every element ⟺ max(|d| - rtol·|y|) <= atol + allow_c.
    """
    if mom.torch_diff is None or mom.torch_excess is None:
        return
    atol, rtol, allow = judge.limits(c)
    yabs = torch.maximum(mom.ymin.abs(), mom.ymax.abs()).nan_to_num(nan=0.0, posinf=0.0)
    c.residual = float(mom.torch_diff.max().item()) if mom.torch_diff.numel() else 0.0
    c.exact_fit = bool((mom.torch_excess <= atol + allow).all().item())
    lower = (mom.torch_diff / (atol + allow + rtol * yabs).clamp_min(1e-300)).max()
    c.score = float(lower.item()) if mom.torch_diff.numel() else 0.0
    if not c.exact_fit:
        c.score = max(c.score, 1.0 + 1e-9)


def _score(
    y: torch.Tensor, yh: torch.Tensor, atol: float, rtol: float, allow: torch.Tensor
) -> tuple[float, float]:
    """(max |y - yh|, max |y - yh| / tolerance); NaN agrees with NaN only."""
    d = (y - yh).abs()
    same = (y == yh) | (y.isnan() & yh.isnan())
    d = torch.where(same, torch.zeros((), dtype=F64, device=d.device), d)
    d = torch.nan_to_num(d, nan=float("inf"))
    if d.numel() == 0:
        return 0.0, 0.0
    bound = atol + rtol * y.abs().nan_to_num(nan=0.0, posinf=0.0) + allow
    ratio = torch.where(d == 0, torch.zeros_like(d), d / bound.clamp_min(1e-300))
    return float(d.max().item()), float(ratio.max().item())


def screen(cands: Sequence[Candidate], s: Sample, judge: Judge) -> None:
    """Score every candidate on the sample (a lower bound of its exact score).

    Plain per-channel affine candidates, the bulk, are scored together in a few batched ops.
    """
    plain = [
        c
        for c in cands
        if type(c.pred) is ChannelAffine
        and c.pred.axis == 1
        and c.tol_dtype is None
        and c.extra_tol is None
    ]
    if plain:
        _screen_affine(plain, s, judge)
    done = {id(c) for c in plain}
    for c in cands:
        if id(c) in done:
            continue
        if c.exact_fit is not None:
            c.sample_score = c.score
            continue
        atol, rtol, allow = judge.limits(c)
        try:
            yh = c.pred.sample(s)
        except (RuntimeError, IndexError):
            c.sample_score = float("inf")
            continue
        _, c.sample_score = _score(s.y, yh, atol, rtol, allow[None, :])


def _screen_affine(cands: Sequence[Candidate], s: Sample, judge: Judge) -> None:
    preds = [c.pred for c in cands]
    assert all(isinstance(p, ChannelAffine) for p in preds)
    a = torch.stack([p.a for p in preds if isinstance(p, ChannelAffine)])
    b = torch.stack([p.b for p in preds if isinstance(p, ChannelAffine)])
    beta = torch.stack([p.beta for p in preds if isinstance(p, ChannelAffine)])
    if judge.tol.explicit:
        assert judge.tol.atol is not None and judge.tol.rtol is not None
        atol, rtol = judge.tol.atol, judge.tol.rtol
        allow = torch.zeros_like(a)
    else:
        atol, rtol = default_pair(str(judge.dtype).removeprefix("torch."))
        scale = a.abs() * judge.xabs + b.abs() + beta.abs()
        allow = ROUNDING_K * torch.finfo(judge.dtype).eps * scale
        allow = torch.nan_to_num(allow, nan=0.0, posinf=0.0, neginf=0.0)
    y = s.y[None]
    base = atol + rtol * y.abs().nan_to_num(nan=0.0, posinf=0.0)
    step = max(1, (1 << 17) // max(s.y.numel(), 1))
    scores: list[float] = []
    for k0 in range(0, a.shape[0], step):
        sl = slice(k0, k0 + step)
        yh = a[sl, None, :] * s.x[None] + b[sl, None, :]
        d = (y - yh).abs()
        d = torch.where((y == yh) | (y.isnan() & yh.isnan()), torch.zeros_like(d), d)
        d = torch.nan_to_num(d, nan=float("inf"))
        bound = (base + allow[sl, None, :]).clamp_min(1e-300)
        ratio = torch.where(d == 0, torch.zeros_like(d), d / bound)
        scores += ratio.flatten(1).amax(dim=1).tolist() if d.numel() else [0.0] * yh.shape[0]
    for c, sc in zip(cands, scores, strict=True):
        c.sample_score = sc


def exact(cands: Sequence[Candidate], x: torch.Tensor, y: torch.Tensor, judge: Judge) -> None:
    """Score candidates on every element, chunk by chunk, in float64."""
    cands = [c for c in cands if c.exact_fit is None]
    if not cands:
        return
    lim = [judge.limits(c) for c in cands]
    res = [0.0] * len(cands)
    sco = [0.0] * len(cands)
    for ns, cs in chunks(x.shape):
        xc = x[ns, cs].to(F64)
        yc = y[ns, cs].to(F64)
        for i, c in enumerate(cands):
            atol, rtol, allow = lim[i]
            r, s = _score(yc, c.pred.chunk(xc, ns, cs), atol, rtol, _bcast(allow[cs], xc.dim()))
            res[i] = max(res[i], r)
            sco[i] = max(sco[i], s)
    for i, c in enumerate(cands):
        c.residual, c.score = res[i], sco[i]
