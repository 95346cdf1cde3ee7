"""Wires the stages: load -> capture -> recompute -> compare -> (diagnose) -> report.

What the CLI and the Python API both call. Nothing here prints, exits or reads argv.
"""

from __future__ import annotations

import difflib
import fnmatch
import gc
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import kernels
from . import load as load_mod
from .capture import BnCall, Capture, is_bn_like, named_modules
from .channel_table import ChannelTable
from .compare import Comparison, close, compare, dtype_name, resolve, rounding_allowance
from .device import device_type, tf32_finding
from .errors import BnDiffError, ModelError, UsageError
from .fused import fused_check
from .loadsafe import display
from .oddities import capture_findings, check_device, empty_batch, empty_update, refuse_unsupported
from .recompute import (
    F64,
    Moments,
    Vec,
    as_f64,
    channel_moments,
    update_momentum,
)
from .results import (
    Finding,
    LayerInfo,
    LayerResult,
    RunningUpdate,
    RunReport,
    Tolerance,
)

Extension = Callable[[BnCall, LayerResult], LayerResult]
"""A later stage that sees each call while its tensors are alive (diagnosis, explain)."""
Progress = Callable[[int, int, str], None]
"""(calls done, BN modules in the model, name of the last call)."""


class _HookFailure(Exception):
    """Marks an exception raised by bn-diff's own code inside a hook (a bug, not the model's)."""


def make_tolerance(atol: float | None, rtol: float | None, rounding_k: float = 4.0) -> Tolerance:
    if (atol is None) != (rtol is None):
        raise UsageError("--atol and --rtol go together", "give both, or neither for the defaults")
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise UsageError(f"--{name} must be a finite number >= 0, not {v}", None)
    return Tolerance(atol=atol, rtol=rtol, rounding_k=rounding_k)


# --- one BN call ------------------------------------------------------------------------------
def check_call(call: BnCall, tol: Tolerance) -> LayerResult:
    """Recompute one BN call in float64 and compare it with what PyTorch produced."""
    x, y = call.x, call.y
    if x.requires_grad or y.requires_grad:
        x, y = x.detach(), y.detach()
    c = int(x.shape[1]) if x.dim() >= 2 else 1
    if x.dim() < 2:
        x = x.reshape(1, -1)
        y = y.reshape(1, -1)
        c = int(x.shape[1])
    dev = x.device
    gamma, beta, rm, rv, after = _params(call, c, dev)
    atol, rtol = resolve(tol, y.dtype)
    fast = fused_check(x, y, gamma, beta, rm, rv, call.use_batch_stats, call.eps, tol)
    if fast is not None:  # one fused float64 pass; the reference path where it matters
        mom, allow, cmp = fast.moments, fast.allowance, fast.comparison
    else:
        mom, allow, cmp = reference_check(
            x, y, gamma, beta, rm, rv, call.use_batch_stats, call.eps, tol
        )
    # the rest is arithmetic on (C,) vectors: on the host, in NumPy, one transfer on a GPU
    h, sd = _host_rows(mom, allow, cmp, gamma, beta, rm, rv, after, call.eps)
    gaps = update = None
    with np.errstate(all="ignore"):  # NaN and Inf follow the torch formulas' conventions
        if rm is not None and rv is not None and mom.count:
            gaps = _train_eval_gap(call.eps, h, sd)
        if call.updates_running_stats:
            update = _check_running_update(call, mom.count, h) if mom.count else empty_update(call)
        gap = None if gaps is None or gaps.size == 0 else _nanmax(gaps)
    info = LayerInfo(
        name=call.name,
        type=call.type,
        mode="train" if call.training else "eval",
        stats="batch" if (call.use_batch_stats or rm is None) else "running",
        num_features=c,
        eps=call.eps,
        momentum=call.momentum,
        affine=call.affine,
        track_running_stats=call.track_running_stats,
        producer=call.producer,
        dtype=dtype_name(y.dtype),
        shape=tuple(x.shape),
        weight_frozen=_frozen(call),
        num_batches_tracked=call.num_batches_tracked_before,
    )
    present = (rm is not None, rv is not None, call.weight is not None, call.bias is not None)
    names = _COLUMNS[(*present, gaps is not None)]
    return LayerResult(
        findings=empty_batch(call) if mom.count == 0 else (),
        info=info,
        # the table takes the rows as they are: ChannelStats objects are made when read
        channels=ChannelTable.adopt(_tensor(h[:_MISM]), names, _tensor(h[_MISM])),
        numel=cmp.numel,
        mismatched=cmp.mismatched,
        max_abs_diff=cmp.max_abs_diff,
        max_abs_index=cmp.max_abs_index,
        max_rel_diff=cmp.max_rel_diff,
        max_rel_index=cmp.max_rel_index,
        atol=atol,
        rtol=rtol,
        train_eval_gap=gap,
        running_update=update,
    )


def reference_check(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rm: torch.Tensor | None,
    rv: torch.Tensor | None,
    use_batch_stats: bool,
    eps: float,
    tol: Tolerance,
) -> tuple[Moments, torch.Tensor, Comparison]:
    """The reference path: float64 statistics, then the float64 comparison, chunk by chunk.

    What `fused_check` must agree with; used where the fused path does not apply.
    """
    mom = channel_moments(x)
    if use_batch_stats or rm is None or rv is None:
        mean, var = mom.mean, mom.var
    else:
        mean, var = rm, rv
    atol, rtol = resolve(tol, y.dtype)
    allow = rounding_allowance(tol, y.dtype, mom, mean, var, gamma, beta, eps)
    return mom, allow, compare(x, y, mean, var, gamma, beta, eps, atol, rtol, allow)


def _nanmax(v: Vec) -> float:
    """The greatest value that is not NaN (NaN when there is none); v not empty."""
    m = float(v.max())
    return m if m == m else float(np.fmax.reduce(v))  # max is NaN where v holds one


def _frozen(call: BnCall) -> bool:
    ps = [p for p in (call.weight, call.bias) if isinstance(p, nn.Parameter)]
    return bool(ps) and not any(p.requires_grad for p in ps)


def _params(
    call: BnCall, c: int, dev: torch.device
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor | None,
    tuple[torch.Tensor, torch.Tensor] | None,
]:
    """gamma, beta and the running mean and var before the call, as `as_f64` makes them
    ((C,) float64 on the activation's device), and where the call updates the running
    statistics, those after it (mean, var) as they are (`_host_rows` widens them)."""
    rm0, rv0 = call.running_mean_before, call.running_var_before
    raw = (call.weight, call.bias, rm0, rv0)
    got: list[torch.Tensor | None]
    if all(v is None or (v.shape == (c,) and v.device == dev) for v in raw):
        # as_f64 without its detach and reshape: one kind of torch op, cheaper in a hook
        got = [None if v is None else v.to(F64) for v in raw]
        if any(t is not None and t.requires_grad for t in got):  # a float64 parameter itself
            got = [None if t is None else t.detach() for t in got]
    else:
        got = [None if v is None else as_f64(v, c, 0.0, dev) for v in raw]
    g = got[0] if got[0] is not None else as_f64(None, c, 1.0, dev)
    b = got[1] if got[1] is not None else as_f64(None, c, 0.0, dev)
    rm1 = rv1 = None
    if call.updates_running_stats and rm0 is not None and rv0 is not None:
        rm1, rv1 = call.running_mean_after, call.running_var_after
    after = None if rm1 is None or rv1 is None else (rm1, rv1)  # made float64 with the rest
    return g, b, got[2], got[3], after


# Rows of the host array `_host_rows` makes. The first _MISM are the ChannelTable's float
# columns (a placeholder where one is absent; the gap's row is written after); then the counts.
_MEAN, _VAR, _RM, _RV, _GAMMA, _BETA, _CHMAX, _ALLOW, _GAP, _MISM, _LO, _HI, _RM1, _RV1 = range(14)
_ROWS = {
    "batch_mean": _MEAN,
    "batch_var": _VAR,
    "running_mean": _RM,
    "running_var": _RV,
    "gamma": _GAMMA,
    "beta": _BETA,
    "max_abs_diff": _CHMAX,
    "tolerance": _ALLOW,
    "train_eval_gap": _GAP,
}
_OPTIONAL = ("running_mean", "running_var", "gamma", "beta", "train_eval_gap")
_COLUMNS: dict[tuple[bool, ...], dict[str, int]] = {
    flags: {k: r for k, r in _ROWS.items() if k not in _OPTIONAL or flags[_OPTIONAL.index(k)]}
    for flags in product((False, True), repeat=len(_OPTIONAL))
}
"""The table's present columns and their rows, by (running_mean, running_var, gamma, beta,
train_eval_gap) present. Shared: ChannelTable never changes its `_rows`."""


def _host_rows(
    mom: Moments,
    allow: torch.Tensor,
    cmp: Comparison,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    rm: torch.Tensor | None,
    rv: torch.Tensor | None,
    after: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
) -> tuple[Vec, Vec | None]:
    """Every (C,) vector the rest of `check_call` reads, as the rows (above) of one new float64
    host array: on CPU one NumPy copy of their views, elsewhere one transfer. The counts are
    exact in float64 below 2**53.

    Off the CPU also sqrt(var + eps) of the batch and running variances (the gap's), taken on
    the device as the torch formulas took them; on CPU None (torch's CPU root, on the host)."""
    mean = mom.mean
    ts = [
        mean,
        mom.var,
        mean if rm is None else rm,
        mean if rv is None else rv,
        gamma,
        beta,
        cmp.channel_max_abs,
        allow,
        mean,  # the gap's place
        cmp.channel_mismatched,
        mom.min,
        mom.max,
    ]
    if after is not None:
        ts += after
    try:
        return np.array([t.numpy() for t in ts], dtype=np.float64), None
    except (TypeError, RuntimeError):  # not on the CPU (or not plain tensors)
        pass
    ts = [t.detach().to(mean.device, F64).reshape(-1) for t in ts]
    n = len(ts)
    if rv is not None:  # the square roots of the gap where the old formulas took them
        ts += torch.sqrt(torch.stack([ts[_VAR], ts[_RV]]) + eps).unbind(0)
    both: Vec = torch.stack(ts).cpu().numpy()  # one transfer
    return both[:n], both[n:] if rv is not None else None


_tensor = torch.from_numpy


def _train_eval_gap(eps: float, h: Vec, sd: Vec | None = None) -> Vec:
    """Per channel, the greatest |y_other_mode - y| over the channel's inputs, written into the
    gap's row of `h` (`_host_rows`; the running statistics present).

    Both modes are affine in x per channel, so the gap is largest at the channel's min or max.
    `recompute.coefficients` of both modes (rows: batch, running), with torch's square roots:
    `sd` where given (sqrt(var + eps), `_host_rows`), else taken here.
    """
    if sd is None:
        sd = h[_VAR : _RV + 1 : 2] + eps
        _tensor(sd).sqrt_()  # torch's square root, in place
    a = h[_GAMMA] / sd
    b = h[_BETA] - a * h[_MEAN : _RM + 1 : 2]
    da, db = a[1] - a[0], b[1] - b[0]
    g = np.abs(da * h[_LO : _HI + 1] + db)
    gap: Vec = np.maximum(g[0], g[1], out=h[_GAP])
    return gap


def _check_running_update(call: BnCall, count: int, h: Vec) -> RunningUpdate | None:
    """The running statistics after the call against `recompute.running_update`'s: the same
    arithmetic, on the host, on (2, C) arrays (rows: mean, var)."""
    after = call.running_mean_after
    if len(h) <= _RV1 or after is None:
        return None
    r0, r1 = h[_RM : _RV + 1], h[_RM1 : _RV1 + 1]
    nbt, k = update_momentum(call.num_batches_tracked_before, call.momentum)
    unb = count / (count - 1) if count > 1 else 1.0
    # Moments.var_unbiased: var * (m / (m - 1)), NaN for m = 1; the mean times 1.0 is itself
    exp = (1 - k) * r0 + k * (h[_MEAN : _VAR + 1] * _unbias(count))  # recompute.running_update
    absmax = np.abs(h[_LO : _HI + 1]).max(axis=0)  # Moments.absmax
    # absmax**2 is absmax * absmax, correctly rounded (torch's pow with exponent 2 multiplies)
    scale = np.abs(r0) + np.array([k * absmax, k * unb * (absmax * absmax)]) + np.abs(exp)
    eps = _EPS.get(after.dtype)
    if eps is None:
        eps = (torch.finfo(after.dtype) if after.dtype.is_floating_point else _F32).eps
    d = np.abs(r1 - exp)
    dmax = d.max(axis=1).tolist() if d.size else [0.0, 0.0]
    # every value >= 0 (or NaN) when k >= 0: the sum is finite exactly when all of them are
    if k >= 0 and math.isfinite(float(scale.max(initial=0.0)) + dmax[0] + dmax[1]):
        # all finite: absdiff is |r1 - exp|, nan_to_num changes nothing, and d <= bound
        # everywhere exactly when d - bound <= 0 everywhere (the sign of a rounded difference)
        ok = d.size == 0 or float((d - (4 * eps * scale + 1e-12)).max()) <= 0.0
    else:  # NaN or Inf somewhere: compare.absdiff's and nan_to_num's conventions, spelled out
        d = _absdiff(r1, exp)
        ok = bool((d <= 4 * eps * _nan_to_num(scale, 0.0) + 1e-12).all())
        dmax = d.max(axis=1).tolist() if d.size else [0.0, 0.0]
    nbt_ok = nbt is None or nbt == call.num_batches_tracked_after
    change = np.abs(r1 - r0).max(axis=1).tolist() if d.size else [0.0, 0.0]
    return RunningUpdate(
        momentum_used=k,
        max_abs_diff_mean=dmax[0],
        max_abs_diff_var=dmax[1],
        num_batches_tracked_ok=nbt_ok,
        ok=ok and nbt_ok,
        largest_mean_change=change[0],
        largest_var_change=change[1],
    )


_F32 = torch.finfo(torch.float32)
_EPS = {t: torch.finfo(t).eps for t in (torch.float16, torch.bfloat16, torch.float32, F64)}
"""torch.finfo(dtype).eps of the usual buffer dtypes."""


def _unbias(count: int) -> Vec:
    """(2, 1): 1 for the mean, m/(m-1) for the variance (NaN for m <= 1)."""
    f: Vec = np.array([[1.0], [count / (count - 1) if count > 1 else math.nan]])
    return f


def _absdiff(a: Vec, e: Vec) -> Vec:
    """`compare.absdiff` on float64 host arrays: 0 where equal or both NaN, inf where only one
    is NaN, and (torch's nan_to_num) the greatest float64 where the difference is infinite."""
    d = np.abs(a - e)
    d[(a == e) | (np.isnan(a) & np.isnan(e))] = 0.0
    return _nan_to_num(d, math.inf)


def _nan_to_num(v: Vec, nan: float) -> Vec:
    """torch's `v.nan_to_num(nan=nan)`: +-inf also become the greatest and least float64."""
    out: Vec = np.nan_to_num(v, nan=nan, posinf=_F64MAX, neginf=-_F64MAX)
    return out


_F64MAX = float(np.finfo(np.float64).max)


# --- a whole run ------------------------------------------------------------------------------
def bn_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in named_modules(model) if is_bn_like(m)]


def _select(names: Sequence[str], globs: Sequence[str]) -> Callable[[str], bool]:
    if not globs:
        return lambda _n: True
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            close_names = difflib.get_close_matches(g, names, n=3, cutoff=0.5)
            hint = (
                "did you mean " + ", ".join(close_names) + "?"
                if close_names
                else ("`bn-diff layers MODEL` lists them")
            )
            raise UsageError(f"--layer {g!r} matches no BatchNorm layer", hint)

    def pick(name: str) -> bool:
        base = name.split("#")[0].split(":")[0]
        return any(fnmatch.fnmatchcase(base, g) or fnmatch.fnmatchcase(name, g) for g in globs)

    return pick


def as_inputs(inputs: Any) -> load_mod.Inputs:
    if isinstance(inputs, load_mod.Inputs):
        return inputs
    if isinstance(inputs, torch.Tensor):
        return load_mod.Inputs((inputs,), {}, "tensor")
    if isinstance(inputs, (tuple, list)):
        return load_mod.Inputs(tuple(inputs), {}, "tensors")
    if isinstance(inputs, dict):
        return load_mod.Inputs((), dict(inputs), "tensors")
    raise UsageError(
        f"inputs must be a tensor, a tuple/list or a dict of tensors, not {type(inputs)}"
    )


def run(
    model: nn.Module,
    inputs: Any,
    *,
    mode: str = "as-is",
    atol: float | None = None,
    rtol: float | None = None,
    layers: Sequence[str] = (),
    extensions: Sequence[Extension] = (),
    progress: Progress | None = None,
    model_name: str = "",
    input_name: str = "",
    fail_on: str | None = None,
    health: bool = True,
    kernel: str | None = None,
) -> RunReport:
    """Run `model` on `inputs`, check every BatchNorm call, and leave the model as found.

    `inputs` is a tensor, a tuple/list of tensors (positional), a dict (keyword), or `Inputs`.
    `health` adds the health findings (bn_diff/health.py) before any other `extensions`.
    `kernel` ("auto", "compiled", "eager"; None: $BN_DIFF_KERNEL or "auto") chooses how the
    fused pass runs (bn_diff/kernels.py): the verdict is the same, only the time differs.
    """
    if mode not in ("as-is", "train", "eval"):
        raise UsageError(f"--mode must be as-is, train or eval, not {mode!r}")
    if kernel is not None and kernel not in kernels.POLICIES:
        raise UsageError(
            f"--kernel must be {', '.join(kernels.POLICIES)}, not {kernel!r}",
            "auto compiles once the work pays for it; eager never compiles",
        )
    env = kernels.env_policy()
    if kernel is None and env is not None and env not in kernels.POLICIES:
        raise UsageError(
            f"${kernels.ENV} must be {', '.join(kernels.POLICIES)}, not {env!r}",
            f"unset {kernels.ENV} for the default (auto)",
        )
    with kernels.using(kernel):
        return _run(
            model,
            inputs,
            mode,
            atol,
            rtol,
            layers,
            extensions,
            progress,
            model_name,
            input_name,
            fail_on,
            health,
        )


def _run(
    model: nn.Module,
    inputs: Any,
    mode: str,
    atol: float | None,
    rtol: float | None,
    layers: Sequence[str],
    extensions: Sequence[Extension],
    progress: Progress | None,
    model_name: str,
    input_name: str,
    fail_on: str | None,
    health: bool,
) -> RunReport:
    if fail_on not in (None, "info", "warning", "error"):
        raise UsageError(f"--fail-on must be warning or error, not {fail_on!r}")
    tol = make_tolerance(atol, rtol)
    inp = as_inputs(inputs)
    names = bn_layer_names(model)
    pick = _select(names, layers)
    results: list[LayerResult] = []
    findings: list[Finding] = []
    if health:
        from .health import HealthCheck

        extensions = [HealthCheck(model, mode), *extensions]

    nonfinite = [
        i
        for i, t in enumerate(inp.tensors())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if nonfinite:
        findings.append(
            Finding(
                "nonfinite_input",
                "warning",
                "the input holds NaN or Inf values; they propagate into every BN's statistics",
                "clean the input, unless this is what you are debugging",
            )
        )

    tf32 = tf32_finding(run_device(model, inp), torch.backends.cudnn.allow_tf32)
    if tf32 is not None:
        findings.append(tf32)

    def on_bn(call: BnCall) -> None:
        if not pick(call.name):
            return
        try:
            # outside Capture's torch-function mode: the checks' own torch calls are not the
            # model's, and would each pay the mode's Python dispatch
            with torch._C.DisableTorchFunction():
                res = check_call(call, tol)
                for ext in extensions:
                    res = ext(call, res)
        except BnDiffError:
            raise
        except Exception as e:
            raise _HookFailure() from e
        results.append(res)
        if progress is not None:
            progress(len(results), len(names), call.name)

    refuse_unsupported(model)
    kernel_failure = kernels.status()["failure"]
    cap = Capture(model, on_bn, mode=mode)
    failure: Exception | None = None
    try:
        with torch.no_grad(), cap, paused_gc():
            try:
                model(*inp.args, **inp.kwargs)
            except (_HookFailure, BnDiffError):
                raise
            except Exception as e:  # what the model's own forward raises is about the model
                failure = e
    except _HookFailure as e:
        assert e.__cause__ is not None
        raise e.__cause__ from None
    if failure is not None:
        raise _model_error(model, inp, failure, mode) from None
    findings.extend(capture_findings(cap))
    failure_now = kernels.status()["failure"]
    if failure_now is not None and (
        failure_now != kernel_failure or kernels.policy() == "compiled"
    ):
        recompiles = "recompile" in failure_now.lower()
        findings.append(
            Finding(
                "kernel_unavailable",
                "info",
                f"the compiled check kernel is unavailable in this process ({failure_now}); the "
                "eager pass checked the layers it would have taken: same verdict, more time",
                "too many shape or dtype variants for one process: pass --kernel eager"
                if recompiles
                else "install a C++ compiler (CPU) or Triton (GPU), or pass --kernel eager",
            )
        )

    if not names and not results:
        findings.append(
            Finding("no_bn_layers", "info", "the model has no BatchNorm layers; nothing to check")
        )
    return RunReport(
        model=model_name or type(model).__name__,
        input=input_name or inp.source,
        mode=mode,
        tolerance=tol,
        layers=tuple(results),
        findings=tuple(findings),
        device=str(next((t.device for t in inp.tensors()), "cpu")),
        fail_on=fail_on,  # type: ignore[arg-type]
    )


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for one checked forward: the checks create tens of
    thousands of small result objects (no cycles), which otherwise trigger full collections
    over every Python object of the process (tens of ms, at random)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_device(model: nn.Module, inp: load_mod.Inputs) -> str:
    """ "cuda" when the inputs or the model's parameters are on a GPU, else "cpu" (or meta...)."""
    return device_type([*inp.tensors(), *model.parameters()])


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in named_modules(model):
        if hasattr(m, "in_channels") or hasattr(m, "in_features") or is_bn_like(m):
            return name, m
    return None


def _model_error(model: nn.Module, inp: load_mod.Inputs, e: Exception, mode: str) -> ModelError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    shapes = ", ".join(str(tuple(t.shape)) for t in inp.tensors())
    if "Expected more than 1 value per channel when training" in msg:
        return ModelError(
            f"a BatchNorm layer in train mode got one value per channel (input {shapes}): the batch "
            "variance of a single value is 0, so PyTorch refuses",
            "use a batch of 2 or more, or --mode eval to use the running statistics",
        )
    first = _first_layer(model)
    if first is not None and re.search(r"channels|size mismatch|shape|mat1 and mat2", msg):
        name, m = first
        want = (
            getattr(m, "in_channels", None)
            or getattr(m, "in_features", None)
            or getattr(m, "num_features", None)
        )
        return ModelError(
            f"the model cannot run on input {shapes}: its first layer {name} "
            f"({type(m).__name__}) expects {want} input channels ({msg[:120]})",
            "check the input file, or --input-shape",
        )
    if re.search(r"dtype|type \(|should be the same", msg):
        return ModelError(
            f"the model cannot run on input {shapes}: {msg[:200]}",
            "cast the input to the model's dtype",
        )
    return ModelError(f"the model's forward failed on input {shapes}: {msg[:200]}", None)


LOAD_OPTIONS = ("input_shape", "seed", "arch", "trust", "imports", "pythonpath", "device")
"""Keyword options of `run_files` that belong to the load stage (`load_model_and_inputs`)."""


def split_load_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the load-stage options from `kwargs` and return them."""
    return {k: kwargs.pop(k) for k in LOAD_OPTIONS if k in kwargs}


def run_files(model_path: Path, input_path: Path | None, **kwargs: Any) -> RunReport:
    """`bn-diff run MODEL INPUT`: load both (LOAD_OPTIONS), then `run` (the other options)."""
    model, inp = load_model_and_inputs(model_path, input_path, **split_load_options(kwargs))
    return run(model, inp, model_name=display(model_path), input_name=inp.source, **kwargs)


def load_model_and_inputs(
    model_path: Path,
    input_path: Path | None,
    *,
    input_shape: str | None = None,
    seed: int = 0,
    arch: str | None = None,
    trust: bool = False,
    imports: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
    device: str = "cpu",
) -> tuple[nn.Module, load_mod.Inputs]:
    """The load stage of `run`: the model and its inputs, both on `device`."""
    model = load_mod.load_model(
        model_path, arch=arch, trust=trust, imports=imports, pythonpath=pythonpath
    )
    inp = load_inputs(input_path, input_shape, seed)
    if device != "cpu":
        check_device(device)
        model = model.to(device)
        inp = inp.to(device)
    return model, inp


def load_inputs(input_path: Path | None, input_shape: str | None, seed: int) -> load_mod.Inputs:
    if input_path is not None and input_shape is not None:
        raise UsageError("give INPUT or --input-shape, not both")
    if input_path is None:
        if input_shape is None:
            raise UsageError("missing INPUT", "pass an input file, or --input-shape 8,3,224,224")
        return load_mod.synthetic_input(load_mod.parse_shape(input_shape), seed)
    return load_mod.load_inputs(input_path)


def with_findings(result: LayerResult, extra: Sequence[Finding]) -> LayerResult:
    return replace(result, findings=result.findings + tuple(extra))


__all__ = ["check_call", "run", "run_files", "make_tolerance", "close", "with_findings"]


def describe_layers(model: nn.Module) -> list[dict[str, Any]]:
    """Conv and normalization layers with their configuration, in module order (no forward)."""
    from .capture import CONV_TYPES, NORM_TYPES

    rows: list[dict[str, Any]] = []
    for name, m in named_modules(model):
        if isinstance(m, CONV_TYPES):
            cfg: dict[str, Any] = {
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "kernel_size": list(getattr(m, "kernel_size", ())),
                "stride": list(getattr(m, "stride", ())),
                "groups": m.groups,
                "bias": m.bias is not None,
            }
            kind = "conv"
        elif is_bn_like(m):
            rm = getattr(m, "running_mean", None)
            nbt = getattr(m, "num_batches_tracked", None)
            cfg = {
                "num_features": int(
                    getattr(m, "num_features", rm.numel() if rm is not None else 0)
                ),
                "eps": float(getattr(m, "eps", 0.0)),
                "momentum": getattr(m, "momentum", None),
                "affine": bool(getattr(m, "affine", True)),
                "track_running_stats": bool(getattr(m, "track_running_stats", True)),
                "training": m.training,
                "num_batches_tracked": None if nbt is None else int(nbt.item()),
            }
            kind = "batchnorm"
        elif isinstance(m, NORM_TYPES):
            cfg = {"training": m.training}
            for attr in ("normalized_shape", "num_groups", "num_channels", "num_features", "eps"):
                if hasattr(m, attr):
                    v = getattr(m, attr)
                    cfg[attr] = list(v) if isinstance(v, tuple) else v
            kind = "norm"
        else:
            continue
        rows.append({"name": name, "type": type(m).__name__, "kind": kind, "config": cfg})
    return rows
