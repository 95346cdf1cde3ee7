"""The fused pass as one compiled kernel per layer (inductor: C++ on CPU, Triton on a GPU).

`fused.fused_pass` walks x and y in cache-sized blocks with a dozen eager torch calls per block;
each call writes a float64 temporary, so the pass moves ~160 bytes per element through the caches.
The functions here compute the same per-(sample, channel) partial results, all in float64, in one
generated loop that reads each float32 element of x and y once and writes nothing but the (N, C)
results: the pass then costs about what reading x and y costs.

Compiling is not free (measured on a 2-core CPU, bench/RESULTS.md: ~10 s the first time on a
machine, ~2.6 s per process once torch's on-disk cache holds the kernels, and ~110 MiB more
resident memory for inductor itself), so the policy decides when it pays:
  "eager"     never compile;
  "compiled"  compile at the first eligible layer;
  "auto"      compile once this process has checked AUTO_ELEMS elements (a long loop of runs, or
              one huge activation), when the compile is a small part of the work left.
Where this torch's inductor has `standalone_compile` (with a `fake_mode`) the kernels are compiled
from a symbolic trace and called without dynamo (bn_diff/kernels_direct.py: ~20 µs a call instead
of ~50, ~300 inside a hook); elsewhere by torch.compile, under `_config_patch`.
Where compiling or running a kernel fails (no C++ compiler, no Triton, an unsupported build, too
many shape variants), the reason is kept in `status()["failure"]`, no kernel is tried again in this
process whatever the policy says, and the layer is checked by the eager pass: results never depend
on whether a kernel was used beyond float64 rounding, which the verdict's margins cover
(fused_verdict.MARGIN_ULPS).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels_direct

F64 = torch.float64
POLICIES = ("auto", "compiled", "eager")
ENV = "BN_DIFF_KERNEL"
AUTO_ELEMS = 1 << 31
"""Elements checked in this process before "auto" compiles. The compiled pass saves ~1.0 ns per
element on the 2-core reference machine (ResNet-50, batch 8 and 32), so the next 2^31 elements
repay a warm-cache compile (~2.6 s): a process that has done this much work will likely do as much
again. ResNet-50 at batch 8 checks 89 M elements per run; a single 8 GiB activation tiers up at
once."""
MIN_PLANE = 2048
"""Planes of at least this many values get partial results per (sample, channel) row ("rows");
shorter ones per channel ("fold"). Each row ends in eight horizontal vector reductions, which
short rows cannot amortise: measured on ResNet-50's shapes (2 cores), "fold" takes 0.32 ns per
element at planes of 196 and 784 values against 0.98 and 0.44 for "rows", and "rows" wins only
from ~3000 values on (0.39 vs 0.44 ns)."""
MAX_ROWS = 1 << 24
"""At most this many (sample, channel) rows: the partial results are 8 float64 per row."""
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Float64 layers stay on the eager pass: the snapshots pin their differences to the last bit."""

# inductor would otherwise store y - e and (y - e)/e to memory because several reductions read
# them; with these limits raised it keeps all reductions in the loop that reads x and y
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "realize_reads_threshold": 1 << 10,
    "realize_opcount_threshold": 1 << 10,
    "realize_cpu_opcount_threshold": 1 << 10,
    "realize_acc_reads_threshold": 1 << 10,
    "realize_cpu_acc_reads_threshold": 1 << 10,
}


def _options() -> dict[str, str | int | bool | Callable[..., Any]]:
    """_OPTIONS that this torch's inductor knows (the names move between releases)."""
    import torch._inductor.config as cfg

    return {k: v for k, v in _OPTIONS.items() if hasattr(cfg, k)}


@dataclass
class _State:
    policy: str | None = None
    """None: the environment's BN_DIFF_KERNEL, else "auto"."""
    checked: int = 0
    """Elements the fused pass has checked in this process."""
    failure: str | None = None
    """Why the compiled kernels are off for this process (None while they are not)."""
    used: int = 0
    """Layers checked by a compiled kernel."""


_state = _State()
_scoped: ContextVar[str | None] = ContextVar("bn_diff_kernel_policy", default=None)
_lock = threading.Lock()
_local = threading.local()
_compiled: dict[tuple[str, str], Callable[..., Any]] = {}


def policy() -> str:
    """The policy in force: `using`'s (this thread or task), else set_policy's, else
    $BN_DIFF_KERNEL (see `env_policy`), else "auto"."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _state.policy is not None:
        return _state.policy
    env = env_policy()
    return "auto" if env is None or env not in POLICIES else env


def env_policy() -> str | None:
    """$BN_DIFF_KERNEL, normalised (None when unset or empty); may be invalid, which `run`
    refuses and `policy` reads as "auto"."""
    env = os.environ.get(ENV, "").strip().lower()
    return env or None


def set_policy(value: str | None) -> None:
    """Set the policy for this process (None: back to $BN_DIFF_KERNEL / "auto")."""
    if value is not None and value not in POLICIES:
        raise ValueError(f"kernel policy must be one of {', '.join(POLICIES)}, not {value!r}")
    _state.policy = value


@contextmanager
def using(value: str | None) -> Iterator[None]:
    """The policy `value` for a block (None: leave it as it is)."""
    if value is None:
        yield
        return
    if value not in POLICIES:
        raise ValueError(f"kernel policy must be one of {', '.join(POLICIES)}, not {value!r}")
    token = _scoped.set(value)  # a context variable: runs in other threads keep their own
    try:
        yield
    finally:
        _scoped.reset(token)


def status() -> dict[str, Any]:
    """What the kernels did in this process: policy, elements checked, layers compiled, failure."""
    return {
        "policy": policy(),
        "checked_elements": _state.checked,
        "compiled_layers": _state.used,
        "failure": _state.failure,
    }


def reset() -> None:
    """Forget counters and failures (tests; a long-lived process after fixing its compiler)."""
    global _state
    _state = _State(policy=_state.policy)


def eligible(xv: torch.Tensor, yv: torch.Tensor) -> bool:
    """Whether an (N, C, L) layer can take a compiled kernel at all.

    Locating the greatest difference recomputes one region in float64: a plane ("rows") or a
    whole channel ("fold"). Both must fit the eager pass's block (fused.block_elems), or the
    search would make float64 temporaries the size of the activation; larger layers keep the
    eager pass, whose "split" layout bounds its regions."""
    from .fused import block_elems

    n, c, length = (int(s) for s in xv.shape)
    region = length if layout(length) == "rows" else n * length
    return (
        xv.dtype in DTYPES
        and yv.dtype == xv.dtype
        and region <= block_elems(xv.device)
        and n * c <= MAX_ROWS
        and xv.device.type in ("cpu", "cuda")
    )


def wanted(xv: torch.Tensor, yv: torch.Tensor) -> bool:
    """Count this layer's elements if a kernel could take it, and say whether one should."""
    if not eligible(xv, yv):
        return False
    _state.checked += int(xv.numel())  # the work a kernel could have taken
    p = policy()
    if not (p == "compiled" or (p == "auto" and _state.checked >= AUTO_ELEMS)):
        # decided before anything imports torch._dynamo: on an H200, a run that imported it
        # from its hooks without compiling anything peaked at 1.99x the plain forward's CUDA
        # memory, against 1.28x without the import (ResNet-50, batch 64, eager pass)
        return False
    if _state.failure is not None or _dispatch_mode_active():
        return False
    return _default_stance()


def _default_stance() -> bool:
    """Whether torch.compile compiles right now: under another stance (Capture sets "force_eager"
    for models with compiled submodules; a user may set one) the kernel would run its Python
    source eagerly, on whole float64 tensors."""
    import torch._dynamo

    if torch._dynamo.config.disable:  # TORCHDYNAMO_DISABLE=1: torch.compile returns the function
        return False
    try:
        from torch._dynamo.eval_frame import _stance
    except ImportError:  # older torch: no stances
        return True
    return getattr(_stance, "stance", "default") == "default"


def _dispatch_mode_active() -> bool:
    """A Python dispatch mode (a profiler, a memory spy, FakeTensor) sees eager ops only: compiled
    code under one may fall back to running `_full` eagerly, on whole float64 tensors."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def _make(reduce: tuple[int, ...]) -> dict[str, Callable[..., tuple[torch.Tensor, ...]]]:
    """The kernels for one layout: `reduce` are the axes of (N, C, L) summed per slot, (2,) for
    "rows" (a slot per sample and channel), (0, 2) for "fold" (a slot per channel)."""

    def residuals(
        x: torch.Tensor, y: torch.Tensor, xd: torch.Tensor, na: torch.Tensor, nb: torch.Tensor
    ) -> torch.Tensor:
        """The greatest |y-e| and |(y-e)/(-e)| per slot, stacked as (2, *slots), with
        -e = na·(x-p) + nb and xd = x - p. Magnitudes, not max and min: what the verdict uses,
        in two NaN-propagating reductions per element instead of four."""
        ne = na * xd + nb
        r = y.to(F64) + ne
        q = r / ne
        return torch.stack((r.abs().amax(reduce), q.abs().amax(reduce)))

    def x_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """max and min of x per slot, as float64 (exact)."""
        return x.amax(reduce).to(F64), x.amin(reduce).to(F64)

    def full(
        x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, na: torch.Tensor, nb: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Per slot: Σ(x-p), Σ(x-p)², `residuals`' greatest magnitudes, max and min of x; p, na,
        nb are (C, 1) float64 and -e = na·(x-p) + nb."""
        xd = x.to(F64) - p
        great = residuals(x, y, xd, na, nb)
        s1, s2 = xd.sum(reduce), (xd * xd).sum(reduce)
        return s1, s2, great, *x_extremes(x)

    def sums(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per slot: Σ(x-p), Σ(x-p)², max x, min x (the statistics pass of train mode)."""
        xd = x.to(F64) - p
        return xd.sum(reduce), (xd * xd).sum(reduce), *x_extremes(x)

    def resid(
        x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, na: torch.Tensor, nb: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """`full`'s greatest magnitudes alone: the second pass of train mode
        in "rows", after `sums` (a quarter less work than `full` on ResNet-50's 56x56 planes)."""
        return (residuals(x, y, x.to(F64) - p, na, nb),)

    def train(
        x: torch.Tensor,
        y: torch.Tensor,
        p: torch.Tensor,
        g: torch.Tensor,
        b: torch.Tensor,
        eps: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """`full` with the batch statistics of each channel as the normalization, in one call
        ("fold" only; "rows" keeps `sums` then `resid`: inductor's code for the channel sums of
        rows inside one call was 1.6x slower, bench/RESULTS.md): g, b (C, 1) gamma and beta,
        eps (1, 1). Inductor (torch 2.13, CPU) makes one parallel region with two loops over the
        channels, the sums and then the residuals, so x is read twice; fusing them per channel
        (its "outer loop fusion", which the float32 extremes of x prevent) measured slower. The
        coefficients are `fused.BnArgs.neg_e`'s formula, rounded the kernel's way, which the
        verdict's margins cover like any other difference of evaluation order.

        Then sample 0's own Σ(x-p), Σ(x-p)², max and min per channel (`fused.SampleSums`: what
        the health check of batch dependence needs), a loop over 1/N of x."""
        xd = x.to(F64) - p
        s1, s2 = xd.sum(reduce), (xd * xd).sum(reduce)
        m = x.shape[0] * x.shape[2]
        mean_p = s1 / m
        var = torch.clamp_min(s2 - s1 * mean_p, 0.0) / m
        a = g / torch.sqrt(var.unsqueeze(-1) + eps)
        great = residuals(x, y, xd, -a, a * mean_p.unsqueeze(-1) - b)
        if x.shape[0] == 1:  # batch dependence needs 2 samples (and dynamo compiles 1 apart)
            return s1, s2, great, *x_extremes(x)
        x0, xd0 = x[:1], xd[:1]
        first = (xd0.sum(reduce), (xd0 * xd0).sum(reduce), *x_extremes(x0))
        return s1, s2, great, *x_extremes(x), *first

    out: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
        "full": full,
        "sums": sums,
        "resid": resid,
    }
    if reduce == (0, 2):  # a slot per channel: the statistics are the slot's own
        out["train"] = train
    return out


_SOURCES = {"rows": _make((2,)), "fold": _make((0, 2))}


def layout(length: int) -> str:
    """ "rows" for planes of at least MIN_PLANE values, else "fold" (the eager pass's choice)."""
    return "rows" if length >= MIN_PLANE else "fold"


def _kernel(key: tuple[str, str]) -> Callable[..., Any]:
    """Kernel `key`, compiled at its first call: by inductor without dynamo where this torch
    can (bn_diff/kernels_direct.py: ~20 µs a call warm instead of dynamo's ~50), else by
    torch.compile."""
    with _lock:
        fn = _compiled.get(key)
        if fn is None:
            src = _SOURCES[key[0]][key[1]]
            if kernels_direct.available():
                fn = kernels_direct.Direct(src, _options())
            else:
                fn = torch.compile(src, dynamic=True, fullgraph=True, options=_options())
            _compiled[key] = fn
        return fn


def call(lay: str, name: str, *args: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Run kernel `name` ("full", "sums", "resid" or "train") of layout `lay` ("rows" or
    "fold"); None (and the compiled path off for this process) when it cannot be compiled or
    run."""
    try:
        fn = _kernel((lay, name))
        if isinstance(fn, kernels_direct.Direct):  # no dynamo: none of its settings apply
            out = fn(*args)
        else:
            with _config_patch():
                out = fn(*args)
    except Exception as e:  # no compiler, no Triton, an unsupported build: the eager pass serves
        _state.failure = _describe(e)
        return None
    return tuple(out)


def _config_patch() -> Any:
    """Dynamo's settings for a kernel call, as a context manager: past the recompile limit the
    kernel would silently run eagerly, on whole float64 tensors, so raise instead (dtypes,
    devices and 0/1-sized dimensions each compile once); with suppress_errors a failed compile
    would run it eagerly too, instead of raising. One patch object per thread, made once:
    building it costs more than applying it (a class per call), and older torch keeps a patch's
    prior values on the object."""
    patch = getattr(_local, "patch", None)
    if patch is None:
        import torch._dynamo

        patch = torch._dynamo.config.patch(
            recompile_limit=64, fail_on_recompile_limit_hit=True, suppress_errors=False
        )
        _local.patch = patch
    return patch


def _describe(e: BaseException) -> str:
    """One line: the exception and, when it wraps another (BackendCompilerFailed), the cause."""

    def line(x: BaseException) -> str:
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0]}" if text else type(x).__name__

    inner = getattr(e, "inner_exception", None) or e.__cause__
    return line(e) + (f" ({line(inner)})" if isinstance(inner, BaseException) else "")


def count_layer() -> None:
    _state.used += 1
