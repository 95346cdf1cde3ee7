"""`diagnose`: every mistake is named (confusion matrix), ties are ties, noise is noise."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_diff import diagnose_engine
from bn_diff.diagnose import HYPOTHESIS_IDS, diagnose
from bn_diff.diagnose_engine import co_moments
from bn_diff.diagnose_predict import take_sample
from bn_diff.recompute import chunks as real_chunks
from bn_diff.results import Hypothesis, Tolerance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_cases import (  # noqa: E402
    HYPOTHESES,
    SHAPES,
    TWINS,
    E,
    batch_stats,
    expected,
    healthy,
    make,
    pt_stats,
)

CASES = [
    healthy(shape, training, seed=11 + i)
    for i, shape in enumerate(SHAPES.values())
    for training in (True, False)
]


def run(case, y: torch.Tensor, **kw: object) -> tuple[Hypothesis, ...]:  # type: ignore[no-untyped-def]
    return diagnose(case.x, y, **{**case.kwargs(), **kw})  # type: ignore[arg-type]


def named_first(hyps: tuple[Hypothesis, ...], want: str) -> bool:
    """`want` is ranked first, or tied first with one of its documented twins."""
    top = hyps[0]
    return top.hypothesis == want or (
        want in top.tied_with and top.hypothesis in TWINS.get(want, ())
    )


# --- the confusion matrix ------------------------------------------------------------------------
def test_confusion_matrix_every_identifiable_hypothesis_is_named_first() -> None:
    matrix: Counter[tuple[str, str]] = Counter()
    misses = []
    for case in CASES:
        for hyp in HYPOTHESES:
            y = make(case, hyp)
            if y is None:
                continue
            want = expected(case, hyp)
            got = run(case, y)
            matrix[(want, got[0].hypothesis)] += 1
            if not named_first(got, want):
                misses.append(f"{case.name}: {hyp} -> {[(h.hypothesis, h.tied_with) for h in got]}")
    assert not misses, "\n".join(misses)
    # every id of the generator was exercised on several shapes
    seen = Counter(want for want, _ in matrix.elements())
    assert set(seen) >= set(HYPOTHESES) - {"train_batch_stats", "eval_running_stats"}
    assert all(n >= 2 for n in seen.values())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_healthy_references_match_pytorch(case) -> None:  # type: ignore[no-untyped-def]
    mean, var = pt_stats(case)
    for y in (case.y_torch.clone(), E(case, mean, var).float(), E(case, mean, var)):
        hyps = run(case, y)
        assert hyps[0].hypothesis == "matches_pytorch", hyps
        assert hyps[0].max_abs_residual < 1e-5
    # also without PyTorch's own output: the formula alone
    assert run(case, case.y_torch.clone(), y_torch=None)[0].hypothesis == "matches_pytorch"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_random_noise_is_unexplained(case) -> None:  # type: ignore[no-untyped-def]
    noise = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(5))
    hyps = run(case, noise)
    assert [h.hypothesis for h in hyps] == ["unexplained"]
    h = hyps[0]
    assert h.max_abs_residual > 0.1
    assert "closest" in h.explanation and "not even affine" in h.explanation
    assert h.params["affine_fit_residual"] > 0.1


def test_affine_but_uncatalogued_is_unexplained_with_implied_statistics() -> None:
    case = CASES[5]
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(case.c, generator=g, dtype=torch.float64)
    var = torch.rand(case.c, generator=g, dtype=torch.float64) + 0.2
    hyps = run(case, E(case, mean, var).float())
    assert [h.hypothesis for h in hyps] == ["unexplained"]
    assert "still affine in x per channel" in hyps[0].explanation
    assert "implied means differ" in hyps[0].explanation
    assert hyps[0].params["affine_fit_residual"] < 1e-5


# --- more variants of the same mistakes ----------------------------------------------------------
@pytest.mark.parametrize("case", [CASES[2], CASES[7]], ids=lambda c: c.name)
def test_fitted_parameters_are_recovered(case) -> None:  # type: ignore[no-untyped-def]
    mean, var = pt_stats(case)
    mu, bvar = batch_stats(case.x)
    m = case.m
    rm, rv = case.rm.double(), case.rv.double()
    eps0 = run(case, E(case, mean, var, eps=0.0).float())
    assert eps0[0].hypothesis == "eps_mismatch" and eps0[0].params["eps"] == 0.0
    for k in (0.9, 1 / (case.nbt + 1)):
        y = E(case, (1 - k) * rm + k * mu, (1 - k) * rv + k * bvar * m / (m - 1)).float()
        h = run(case, y)[0]
        assert h.hypothesis == "stats_updated" and h.params["momentum"] == pytest.approx(
            k, rel=1e-3
        )
    h = run(case, E(case, rm / 0.3, rv / 0.3).float())[0]
    assert h.hypothesis == "stats_scale_factor" and h.params["scale"] == pytest.approx(
        0.3, rel=1e-3
    )


@pytest.mark.parametrize("case", [CASES[3], CASES[6]], ids=lambda c: c.name)
def test_non_affine_variants(case) -> None:  # type: ignore[no-untyped-def]
    y = case.y_torch
    relu6 = (6 * y).clamp(0, 6)
    six = run(case, relu6, gamma=6 * case.gamma, beta=6 * case.beta, y_torch=None)
    assert six[0].hypothesis == "fused_activation" and "ReLU6" in six[0].explanation
    for fn, name in ((F.silu, "SiLU"), (F.gelu, "GELU"), (F.hardswish, "Hardswish")):
        h = run(case, fn(y))[0]
        assert h.hypothesis == "fused_activation" and f"{name}(BatchNorm)" in h.explanation
    x = case.x.double()
    dims = tuple(range(1, x.dim()))
    ln = (x - x.mean(dims, keepdim=True)) / torch.sqrt(
        x.var(dims, unbiased=False, keepdim=True) + 1e-5
    )
    shape = (1, -1) + (1,) * (x.dim() - 2)
    ln = ln * case.gamma.double().view(shape) + case.beta.double().view(shape)
    h = run(case, ln.float())[0]
    assert h.hypothesis == "wrong_reduction_axes" and "LayerNorm" in h.explanation
    mean, var = pt_stats(case)
    bf = E(case, mean, var).to(torch.bfloat16).float()
    h = run(case, bf)[0]
    assert h.hypothesis == "half_precision" and "bfloat16" in h.explanation
    dims = [i for i in range(y.dim()) if i != 1]
    q = (y.amax(dim=dims, keepdim=True) - y.amin(dim=dims, keepdim=True)) / 255
    h = run(case, torch.round(y / q) * q)[0]
    assert h.hypothesis == "quantized"


def test_params_permuted_mean_and_var_swapped() -> None:
    case = healthy((8, 6, 20), False, seed=3)
    case.rm = case.rm.abs() + 0.1  # a positive mean, so that it can pose as a variance
    case.y_torch = F.batch_norm(case.x, case.rm, case.rv, case.gamma, case.beta, False)
    h = run(case, E(case, case.rv, case.rm).float())[0]
    assert h.hypothesis == "params_permuted"
    assert "running_mean ← running_var" in h.explanation


def test_batch_size_1_gives_beta() -> None:
    case = healthy((1, 7), False, seed=4)
    hyps = run(case, case.beta.reshape(1, -1).clone())
    assert hyps[0].hypothesis == "batch_size_1"


# --- ties (BN_PITFALLS.md "Ties") ----------------------------------------------------------------
def test_biased_and_unbiased_tie_at_large_m() -> None:
    case = healthy((64, 2, 64, 64), True, seed=6)  # m = 262144: 1/(2m) is below float32 rounding
    mu, var = batch_stats(case.x)
    hyps = run(case, E(case, mu, var * case.m / (case.m - 1)).float())
    ids = {h.hypothesis for h in hyps}
    assert ids == {"matches_pytorch", "unbiased_var"}
    assert hyps[0].tied_with and hyps[1].tied_with


def test_eps_is_a_tie_where_variance_dwarfs_it() -> None:
    case = healthy((8, 4, 16, 16), False, seed=8)
    case.rv = case.rv * 1e4  # var ≫ eps: eps 1e-3 and 1e-5 give the same float32 output
    case.x = case.x * 100
    case.y_torch = F.batch_norm(case.x, case.rm, case.rv, case.gamma, case.beta, False)
    hyps = run(case, case.y_torch.clone())
    assert hyps[0].hypothesis == "matches_pytorch"
    assert hyps[0].tied_with == ("eps_mismatch",)
    assert hyps[1].params["eps"] == 1e-3


def test_untrained_statistics_tie_with_affine_only() -> None:
    case = healthy((4, 3, 6, 6), True, seed=9)
    case.rm, case.rv = torch.zeros(3), torch.ones(3)
    case.nbt = 0
    # |y| <~ 1: the two differ by |y|·5e-6, below float32's atol 1e-5 (larger |y| tells them apart)
    case.x = case.x / case.x.abs().max()
    case.y_torch = F.batch_norm(
        case.x, case.rm.clone(), case.rv.clone(), case.gamma, case.beta, True
    )
    y = case.x * case.gamma.view(1, -1, 1, 1) + case.beta.view(1, -1, 1, 1)
    hyps = run(case, y)
    assert {h.hypothesis for h in hyps[:2]} == {"affine_only", "eval_untrained_stats"}
    assert all("initial values" in h.explanation for h in hyps[:2])


def test_ties_are_symmetric_and_ids_are_stable() -> None:
    for case in CASES[:4]:
        for hyp in HYPOTHESES:
            y = make(case, hyp)
            if y is None:
                continue
            hyps = run(case, y)
            ids = [h.hypothesis for h in hyps]
            assert len(set(ids)) == len(ids)
            for h in hyps:
                assert h.hypothesis in HYPOTHESIS_IDS
                assert set(h.tied_with) == set(ids) - {h.hypothesis}
                assert h.explanation.endswith(".")
                assert h.to_json()["hypothesis"] == h.hypothesis


def test_explicit_tolerance_widens_what_fits() -> None:
    case = CASES[1]
    mean, var = pt_stats(case)
    y = E(case, mean, var, eps=1e-3).float()
    assert run(case, y)[0].hypothesis == "eps_mismatch"
    loose = run(case, y, tol=Tolerance(atol=1.0, rtol=0.0))
    assert loose[0].hypothesis == "matches_pytorch"


def test_shape_mismatch_and_nonfinite_input() -> None:
    case = CASES[0]
    with pytest.raises(Exception, match="does not match"):
        run(case, case.y_torch[:, :2])
    x = case.x.clone()
    x[0, 0] = float("nan")
    hyps = diagnose(x, case.y_torch, **{**case.kwargs(), "y_torch": None})  # type: ignore[arg-type]
    assert hyps[0].hypothesis == "unexplained" and "NaN" in hyps[0].explanation


# --- the arithmetic underneath -------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 4),
    plane=st.sampled_from([(), (3,), (4, 5)]),
    target=st.integers(1, 40),
    shift=st.floats(-1e3, 1e3),
    seed=st.integers(0, 1000),
)
def test_co_moments_equal_two_pass_float64(n, c, plane, target, shift, seed) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *plane), generator=g) + shift
    y = 2.5 * x - 1 + 0.01 * torch.randn(x.shape, generator=g)
    # tiny chunks, so that the merge of partial moments is what gets tested
    with patch.object(diagnose_engine, "chunks", lambda shape: real_chunks(shape, target)):
        mo = co_moments(x, y)
    dims = (0, *range(2, x.dim()))
    x64, y64 = x.double(), y.double()
    dx = x64 - x64.mean(dims, keepdim=True)
    dy = y64 - y64.mean(dims, keepdim=True)
    scale = (dx * dx).sum(dims).clamp_min(1e-12)
    torch.testing.assert_close(mo.mx, x64.mean(dims))
    torch.testing.assert_close(
        mo.cxx, (dx * dx).sum(dims), atol=1e-9 * float(scale.max()), rtol=1e-9
    )
    torch.testing.assert_close(
        mo.cxy, (dx * dy).sum(dims), atol=1e-9 * float(scale.max()), rtol=1e-9
    )
    torch.testing.assert_close(mo.xmax, x64.amax(dims))
    if mo.count >= 2:
        a, b, rms = mo.affine_fit()
        # two nearly equal x values cannot pin the slope against the noise: need some spread
        ok = (dx * dx).sum(dims) > 0.25
        torch.testing.assert_close(a[ok], torch.full_like(a[ok], 2.5), rtol=0.05, atol=0.05)
        assert bool((rms[ok] < 0.05).all())


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from([(1, 3), (5, 2), (3, 4, 7), (2, 3, 4, 5)]), k=st.integers(1, 200))
def test_sample_positions_are_real_elements(shape, k) -> None:  # type: ignore[no-untyped-def]
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    s = take_sample(x, x * 2, None, k)
    for j in range(s.x.shape[0]):
        idx = (int(s.n[j]), slice(None), *(int(t[j]) for t in s.s))
        torch.testing.assert_close(s.x[j], x[idx].double())
    torch.testing.assert_close(s.y, 2 * s.x)
