"""A generator of foreign BatchNorm outputs: for a random healthy layer, what each mistake computes.

Each `make(case, hypothesis)` writes the reference the way foreign code would: in float64 from the
layer's own numbers, rounded to float32 at the end (float16 arithmetic for half_precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bn_diff.diagnose import HYPOTHESIS_IDS

SHAPES: dict[str, tuple[int, ...]] = {
    "bn1d_small_m": (12, 5),  # BatchNorm1d, m = 12
    "bn1d_seq": (8, 6, 20),  # BatchNorm1d on (N, C, L), m = 160
    "bn2d_w_eq_c": (4, 6, 5, 6),  # W == C: channels-last mix-ups are silent in PyTorch
    "bn2d_large_m": (16, 4, 32, 32),  # m = 16384
}


@dataclass
class Case:
    """A healthy BN layer, its input, and PyTorch's output."""

    name: str
    x: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    rm: torch.Tensor
    rv: torch.Tensor
    eps: float
    momentum: float
    nbt: int
    training: bool
    y_torch: torch.Tensor

    @property
    def c(self) -> int:
        return int(self.x.shape[1])

    @property
    def m(self) -> int:
        return self.x.numel() // self.c

    def kwargs(self) -> dict[str, object]:
        return {
            "gamma": self.gamma,
            "beta": self.beta,
            "running_mean": self.rm,
            "running_var": self.rv,
            "eps": self.eps,
            "momentum": self.momentum,
            "num_batches_tracked": self.nbt,
            "use_batch_stats": self.training,
            "y_torch": self.y_torch,
        }


def healthy(shape: tuple[int, ...], training: bool, seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
    gamma = (0.5 + torch.rand(c, generator=g)) * sign
    beta = torch.randn(c, generator=g) * 0.5
    rm = torch.randn(c, generator=g) * 0.5
    rv = 0.1 + 1.5 * torch.rand(c, generator=g)
    # the batch is unlike the running statistics, as real batches are
    mu = rm + 0.3 * torch.randn(c, generator=g)
    sd = torch.sqrt(rv * (0.5 + torch.rand(c, generator=g)))
    bshape = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g) * sd.view(bshape) + mu.view(bshape)
    y = F.batch_norm(x, rm.clone(), rv.clone(), gamma, beta, training, 0.1, 1e-5)
    name = f"{'train' if training else 'eval'}{list(shape)}"
    return Case(name, x, gamma, beta, rm, rv, 1e-5, 0.1, 100, training, y)


def _b(v: torch.Tensor, nd: int, axis: int = 1) -> torch.Tensor:
    shape = [1] * nd
    shape[axis] = -1
    return v.double().reshape(shape)


def E(
    case: Case,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    axis: int = 1,
    x: torch.Tensor | None = None,
) -> torch.Tensor:
    """gamma·(x - mean)/sqrt(var + eps) + beta in float64 (parameters along `axis`)."""
    x64 = (case.x if x is None else x).double()
    nd = x64.dim()
    e = case.eps if eps is None else eps
    g = case.gamma if gamma is None else gamma
    b = case.beta if beta is None else beta
    return (x64 - _b(mean, nd, axis)) / torch.sqrt(_b(var, nd, axis) + e) * _b(g, nd, axis) + _b(
        b, nd, axis
    )


def batch_stats(x: torch.Tensor, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(i for i in range(x.dim()) if i != axis)
    x64 = x.double()
    return x64.mean(dims), x64.var(dims, unbiased=False)


def pt_stats(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return batch_stats(case.x) if case.training else (case.rm.double(), case.rv.double())


def make(case: Case, hyp: str) -> torch.Tensor | None:
    """The reference that mistake `hyp` produces on this case, or None where it cannot arise."""
    x, c, m = case.x, case.c, case.m
    nd = x.dim()
    mu, var = batch_stats(x)
    rm, rv = case.rm.double(), case.rv.double()
    one, zero = torch.ones(c), torch.zeros(c)
    mean_pt, var_pt = pt_stats(case)
    y: torch.Tensor
    if hyp == "matches_pytorch":
        return case.y_torch.clone()
    if hyp == "train_batch_stats":
        y = E(case, mu, var)
    elif hyp == "eval_running_stats":
        y = E(case, rm, rv)
    elif hyp == "eps_mismatch":
        y = E(case, mean_pt, var_pt, eps=1e-3)
    elif hyp == "unbiased_var":
        y = E(case, mu, var * m / (m - 1))
    elif hyp == "affine_only":
        y = x.double() * _b(case.gamma, nd) + _b(case.beta, nd)
    elif hyp == "eval_untrained_stats":
        y = E(case, zero, one)
    elif hyp == "zero_running_var":
        y = E(case, rm, zero)
    elif hyp == "missing_sqrt":
        y = (x.double() - _b(rm, nd)) / _b(rv + case.eps, nd) * _b(case.gamma, nd) + _b(
            case.beta, nd
        )
    elif hyp == "std_as_var":
        y = E(case, rm, rv.sqrt())
    elif hyp == "inv_std_buffer":
        y = (x.double() - _b(rm, nd)) * _b(rv, nd) * _b(case.gamma, nd) + _b(case.beta, nd)
    elif hyp == "stats_scale_factor":
        y = E(case, rm * 4.0, rv * 4.0)  # Caffe blobs not divided by their scale factor 0.25
    elif hyp == "stats_updated":
        k = 0.1
        y = E(case, (1 - k) * rm + k * mu, (1 - k) * rv + k * var * m / (m - 1))
    elif hyp == "gamma_ignored":
        y = E(case, mean_pt, var_pt, gamma=one)
    elif hyp == "beta_ignored":
        y = E(case, mean_pt, var_pt, beta=zero)
    elif hyp == "no_affine":
        y = E(case, mean_pt, var_pt, gamma=one, beta=zero)
    elif hyp == "params_permuted":
        y = E(case, mean_pt, var_pt, gamma=case.beta, beta=case.gamma)
    elif hyp == "nhwc_layout":
        if nd < 3 or x.shape[-1] != c:
            return None
        if case.training:
            y = E(case, *batch_stats(x, nd - 1), axis=nd - 1)
        else:
            y = E(case, rm, rv, axis=nd - 1)
    elif hyp == "wrong_reduction_axes":
        if nd < 3:
            return None
        dims = tuple(range(2, nd))  # InstanceNorm: per sample and channel
        x64 = x.double()
        y = (x64 - x64.mean(dims, keepdim=True)) / torch.sqrt(
            x64.var(dims, unbiased=False, keepdim=True) + case.eps
        )
        y = y * _b(case.gamma, nd) + _b(case.beta, nd)
    elif hyp == "fused_activation":
        y = case.y_torch.double().clamp_min(0)
    elif hyp == "ghost_batch":
        n = x.shape[0]
        if n < 8:
            return None
        parts = [E(case, *batch_stats(xg), x=xg) for xg in x.split(n // 4)]  # 4 ghost batches
        y = torch.cat(parts)
    elif hyp == "half_precision":
        h = torch.float16
        xs = x.to(h)
        sh = (1, c) + (1,) * (nd - 2)
        y16 = (xs - mean_pt.to(h).view(sh)) / torch.sqrt(var_pt.to(h).view(sh) + case.eps)
        y = (y16 * case.gamma.to(h).view(sh) + case.beta.to(h).view(sh)).double()
    elif hyp == "quantized":
        base = case.y_torch.double()
        lo, hi = float(base.min()), float(base.max())
        q = (hi - lo) / 255
        y = torch.round((base - lo) / q) * q + lo
    elif hyp == "batch_size_1":
        return None
    else:
        raise KeyError(hyp)
    return y.to(torch.float32)


# every id the generator can produce (a batch of one and "nothing fits" are tested on their own)
HYPOTHESES = tuple(h for h in HYPOTHESIS_IDS if h not in ("batch_size_1", "unexplained"))
TWINS: dict[str, set[str]] = {
    # BN_PITFALLS.md "Ties": the data cannot tell these apart when the effect is below rounding
    "affine_only": {"eval_untrained_stats"},
    "eval_untrained_stats": {"affine_only"},
    "unbiased_var": {"train_batch_stats", "matches_pytorch"},
    "train_batch_stats": {"unbiased_var"},
}


def expected(case: Case, hyp: str) -> str:
    """The id a correct diagnosis names first: PyTorch's own formula is `matches_pytorch`."""
    if hyp == "train_batch_stats" and case.training:
        return "matches_pytorch"
    if hyp == "eval_running_stats" and not case.training:
        return "matches_pytorch"
    return hyp
