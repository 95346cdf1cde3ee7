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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import kernels
from . import load as load_mod
from .capture import BnCall, Capture, is_bn_like, named_modules
from .compare import close
from .device import device_type, tf32_finding
from .errors import BnDiffError, ModelError, UsageError
from .layer_check import check_call, reference_check
from .loadsafe import display
from .oddities import capture_findings, check_device, refuse_unsupported
from .results import (
    Finding,
    LayerResult,
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
        i for i, t in enumerate(inp.tensors()) if t.is_floating_point() and not all_finite(t)
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


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or Inf: its greatest and least values are
    finite (both reductions propagate NaN). Two reductions without a temporary: ~70 µs on a
    ResNet input of 8x3x224x224 where `torch.isfinite(t).all()` took 1.1 ms."""
    if t.numel() == 0:
        return True
    return math.isfinite(float(t.amax())) and math.isfinite(float(t.amin()))


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


__all__ = [
    "check_call",
    "reference_check",
    "run",
    "run_files",
    "make_tolerance",
    "close",
    "with_findings",
]


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
