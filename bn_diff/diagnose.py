"""Which mistake explains a foreign BatchNorm output? Ranked hypotheses, ties as ties.

`diagnose(x, y_ref, ...)` is a pure function of one BN call's input, the foreign output and the
layer's parameters. Method (BN_PITFALLS.md): one chunked float64 pass gives per-channel co-moments
of (x, y_ref); the least-squares affine fit inverted with gamma and beta gives implied statistics,
from which parametric hypotheses are solved; every hypothesis is screened on a sample and the
survivors are scored exactly, element by element, against a rounding-aware tolerance. What fits is
reported best first; whatever else fits too is named in `tied_with`. Non-affine families are tried
only when nothing affine fits; when nothing fits at all the answer is `unexplained`, with the
residual of the closest hypothesis.
"""

from __future__ import annotations

import torch

from .diagnose_engine import Candidate, Judge, co_moments, exact, score_direct, screen
from .diagnose_families import families, modifiers
from .diagnose_fit import fitted, implied
from .diagnose_forms import Layer, plain
from .diagnose_predict import ChannelAffine, Direct, Sample, take_sample
from .errors import UsageError
from .results import Hypothesis, Tolerance, default_pair

HYPOTHESIS_IDS = (
    "matches_pytorch",
    "train_batch_stats",
    "eval_running_stats",
    "eps_mismatch",
    "unbiased_var",
    "affine_only",
    "eval_untrained_stats",
    "zero_running_var",
    "missing_sqrt",
    "std_as_var",
    "inv_std_buffer",
    "stats_scale_factor",
    "stats_updated",
    "gamma_ignored",
    "beta_ignored",
    "no_affine",
    "params_permuted",
    "nhwc_layout",
    "wrong_reduction_axes",
    "fused_activation",
    "ghost_batch",
    "half_precision",
    "quantized",
    "batch_size_1",
    "unexplained",
)
"""Stable ids (JSON `diagnosis[].hypothesis`)."""
CLOSEST = 4
"""When nothing survives screening, this many of the closest hypotheses are scored exactly."""


def diagnose(
    x: torch.Tensor,
    y_ref: torch.Tensor,
    *,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    num_batches_tracked: int | None = None,
    use_batch_stats: bool = True,
    y_torch: torch.Tensor | None = None,
    tol: Tolerance | None = None,
) -> tuple[Hypothesis, ...]:
    """Ranked hypotheses (best first) that explain `y_ref` as a BatchNorm of `x`.

    x and y_ref are (N, C, *S) in the channel-first layout; `use_batch_stats` says what PyTorch
    normalized with; `y_torch` is PyTorch's own output for this x (optional).
    """
    if x.dim() < 2 or tuple(x.shape) != tuple(y_ref.shape):
        raise UsageError(
            f"reference shape {tuple(y_ref.shape)} does not match the BN input {tuple(x.shape)}"
        )
    if y_torch is not None and tuple(y_torch.shape) != tuple(x.shape):
        y_torch = None
    x, y_ref = x.detach(), y_ref.detach().to(x.device)
    y_ref = y_ref if y_ref.is_floating_point() else y_ref.to(torch.float32)
    c = int(x.shape[1])
    judge_dtype = _coarser(x.dtype, y_ref.dtype)
    rtol = tol.rtol if tol is not None and tol.rtol is not None else None
    if rtol is None:
        rtol = default_pair(str(judge_dtype).removeprefix("torch."))[1]
    mom = co_moments(x, y_ref, y_torch, rtol)
    if mom.nonfinite_x:
        return (
            Hypothesis(
                "unexplained",
                float("nan"),
                f"The BN input holds {mom.nonfinite_x} NaN/Inf values, so no hypothesis "
                "can be tested.",
                "Find where the NaN/Inf values come from first.",
            ),
        )
    dev = x.device

    def vec(t: torch.Tensor | None, fill: float) -> torch.Tensor:
        if t is None:
            return torch.full((c,), fill, dtype=torch.float64, device=dev)
        return t.detach().to(device=dev, dtype=torch.float64).reshape(-1)

    have_running = running_mean is not None and running_var is not None
    layer = Layer(
        gamma=vec(gamma, 1.0),
        beta=vec(beta, 0.0),
        affine=gamma is not None or beta is not None,
        rm=vec(running_mean, 0.0) if have_running else None,
        rv=vec(running_var, 1.0) if have_running else None,
        eps=float(eps),
        momentum=momentum,
        nbt=num_batches_tracked,
        pt_stats="batch" if use_batch_stats or not have_running else "running",
        mom=mom,
        shape=tuple(int(s) for s in x.shape),
    )
    judge = Judge(tol or Tolerance(), judge_dtype, mom.xabs)
    sample = take_sample(x, y_ref, y_torch)

    first = _dedupe(plain(layer, y_torch) + fitted(layer))
    for cand in first:
        if isinstance(cand.pred, Direct):
            score_direct(cand, mom, judge)
    _evaluate(first, sample, x, y_ref, judge)
    found = select(first)
    if found:
        return found
    # not affine: an activation after BN, or other statistics -- at the same strict tolerance
    bases = [c for c in first if c.tier <= 1]
    widened = modifiers(bases, sample, layer)
    strict = [c for c in widened if c.tol_dtype is None and c.extra_tol is None]
    second = strict + families(x, layer)
    _evaluate(second, sample, x, y_ref, judge)
    found = select(second)
    if found:
        return found
    # only then a widened tolerance: a quantization lattice (positive evidence) before float16
    third = [c for c in widened if c not in strict]
    _evaluate(third, sample, x, y_ref, judge)
    quantized = [c for c in third if c.id == "quantized" and c.fits]
    found = select(quantized or third)
    if found:
        return found
    second += third
    return (_unexplained(first + second, layer, sample, x, y_ref, judge),)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    fl = [d for d in (a, b) if d.is_floating_point and d != torch.float64] or [torch.float32]
    if a == b == torch.float64:
        return torch.float64
    return max(fl, key=lambda d: torch.finfo(d).eps)


def _evaluate(
    cands: list[Candidate], sample: Sample, x: torch.Tensor, y: torch.Tensor, judge: Judge
) -> None:
    screen(cands, sample, judge)
    exact([c for c in cands if c.sample_score <= 1.0], x, y, judge)


def _dedupe(cands: list[Candidate]) -> list[Candidate]:
    """Drop a hypothesis that computes exactly what an earlier (preferred) one computes.

    E.g. with beta ≡ 0, "beta ignored" *is* the plain formula: that is not a tie worth naming.
    A random projection of the coefficients finds the few pairs worth comparing in full.
    """
    coefs = [(i, c.coef) for i, c in enumerate(cands)]
    rows = {i: torch.cat(co) for i, co in coefs if co is not None}
    if len(rows) < 2:
        return cands
    table = torch.stack(list(rows.values()))
    r = torch.rand(table.shape[1], generator=torch.Generator().manual_seed(0), dtype=table.dtype)
    finite = table.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    proj = dict(zip(rows, (finite @ r.to(table.device)).tolist(), strict=True))
    mag = dict(zip(rows, (finite.abs() @ r.to(table.device)).tolist(), strict=True))
    kept: list[Candidate] = []
    kept_rows: list[int] = []
    for i, c in enumerate(cands):
        if i in rows:
            twin = next(
                (
                    j
                    for j in kept_rows
                    if abs(proj[i] - proj[j]) <= 1e-10 * (mag[i] + mag[j]) + 1e-300
                    and _same(rows[i], rows[j])
                ),
                None,
            )
            if twin is not None:
                if c.key and not cands[twin].key:
                    cands[twin].key = c.key
                continue
            kept_rows.append(i)
        kept.append(c)
    return kept


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-12, atol=1e-300, equal_nan=True))


def select(cands: list[Candidate]) -> tuple[Hypothesis, ...]:
    """The fitting hypotheses, one per id, best first, each tied with all the others."""
    fit = [c for c in cands if c.fits]
    plain_fits = {c.key for c in fit if c.key}
    # a fitted parameter at a value the data cannot tell from the plain formula is not news;
    # a documented alternative (eps 1e-3 vs 1e-5) that also fits is a tie worth naming
    fit = [
        c for c in fit if not c.generalizes or c.generalizes not in plain_fits or c.documented_alt
    ]
    best: dict[str, Candidate] = {}
    for c in fit:
        best.setdefault(c.id, c)
    ranked = sorted(best.values(), key=lambda c: (c.tier, c.score))
    ids = [c.id for c in ranked]
    return tuple(
        Hypothesis(
            c.id,
            c.residual,
            c.explanation,
            c.fix,
            dict(c.params),
            tuple(i for i in ids if i != c.id),
        )
        for c in ranked
    )


def _unexplained(
    cands: list[Candidate],
    layer: Layer,
    sample: Sample,
    x: torch.Tensor,
    y: torch.Tensor,
    judge: Judge,
) -> Hypothesis:
    a, b, _ = layer.mom.affine_fit()
    const = ~torch.isfinite(a)
    a = torch.where(const, torch.zeros_like(a), a)
    b = torch.where(const, layer.mom.my, b)
    fit = Candidate("affine", ChannelAffine(a, b, layer.beta), "")
    exact([fit], x, y, judge)
    scored = [c for c in cands if c.score < float("inf")]
    rest = sorted((c for c in cands if c.score == float("inf")), key=lambda c: c.sample_score)
    exact(rest[:CLOSEST], x, y, judge)
    pool = [c for c in scored + rest[:CLOSEST] if c.score < float("inf")]
    if fit.fits:  # an affine reference: name the closest affine (catalogued) hypothesis
        pool = [c for c in pool if c.tier <= 2] or pool
    closest = min(pool, key=lambda c: c.score) if pool else None
    params = {"affine_fit_residual": fit.residual}
    text = "None of the catalogued mistakes reproduces the reference within tolerance"
    residual = float("nan")
    if closest is not None:
        residual = closest.residual
        params["closest_residual"] = closest.residual
        text += f"; the closest is {closest.id} (max |Δ| = {closest.residual:.3g})"
    if fit.fits:
        text += (
            f"; the reference is still affine in x per channel (fit residual {fit.residual:.3g}), "
            + _implied_words(layer)
        )
    elif fit.residual < float("inf"):
        text += f"; it is not even affine in x per channel (fit residual {fit.residual:.3g})"
    return Hypothesis(
        "unexplained",
        residual,
        text + ".",
        "Check that your code sees the same BN input (add the producing conv's output to the "
        "reference) and compare the statistics it uses with the per-channel table.",
        params,
    )


def _implied_words(layer: Layer) -> str:
    m_hat, v_hat, ok = implied(layer)
    st = layer.stats(layer.pt_stats)
    if st is None or not bool(ok.any().item()):
        return "so it is a BatchNorm with statistics bn-diff cannot name"
    mean, var = st
    sd = torch.sqrt(var + layer.eps)
    dm = float(((m_hat - mean).abs() / sd)[ok].max().item())
    dv = float((v_hat / (var + layer.eps) - 1).abs()[ok].max().item())
    return (
        f"so it is a BatchNorm with other statistics: implied means differ from PyTorch's by up "
        f"to {dm:.3g} standard deviations and implied var+eps by up to {100 * dv:.3g}%"
    )
