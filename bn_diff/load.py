"""Checkpoints and tensors from disk, safe by default.

Nothing here runs code from a file unless the user said `--trust`: tensors and state_dicts go
through `torch.load(weights_only=True)`, numpy files through `allow_pickle=False` after their header
has been checked against the file size, safetensors through its own parser.
"""

from __future__ import annotations

import importlib
import math
import pickle
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, ModelError, UsageError
from .load_numpy import npy_tensor, npz_tensors
from .loadsafe import (
    check_regular_file,
    display,
    is_zip,
    memory_budget,
    open_archive,
    pickle_globals,
    reason,
)

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass(frozen=True, slots=True)
class Inputs:
    """Positional and keyword tensors for the model's forward."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    """What the input was: a path, or "synthetic normal, seed 0"."""

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def to(self, device: str) -> Inputs:
        return Inputs(
            tuple(t.to(device) for t in self.args),
            {k: v.to(device) for k, v in self.kwargs.items()},
            self.source,
        )


# --- files --------------------------------------------------------------------------------------
def _check_file(path: Path, what: str) -> None:
    check_regular_file(path, what)
    if is_zip(path):  # .pt archives and .npz: refuse zip bombs before a parser inflates them
        open_archive(path, what).close()


def _not_readable(path: Path, what: str, err: BaseException) -> InputError:
    return InputError(
        f"{what} {display(path)} is not a readable PyTorch file ({reason(err)})",
        "it may be truncated or corrupted; re-save it with torch.save",
    )


def _torch_load_safe(path: Path, what: str) -> Any:
    """`torch.load(weights_only=True)` with one-line errors."""
    try:
        with warnings.catch_warnings():  # errors are one line: torch's warnings would add more
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe(path, what, e) from None
    except Exception as e:  # a damaged file makes torch's parsers raise almost any type
        raise _not_readable(path, what, e) from None


def _unsafe(path: Path, what: str, err: Exception) -> InputError:
    names = sorted(pickle_globals(path))  # found by disassembly; nothing is unpickled
    if not names:  # the scan found nothing (damaged archive): torch's own refusal may name it
        m = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        names = [m.group(1)] if m else []
    if names:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return InputError(
            f"{what} {display(path)} is a pickle that needs classes {shown}; unpickling can run "
            "code, so bn-diff refuses it",
            "pass --trust if you trust this file, or save a state_dict and pass --arch "
            "package.module:factory",
        )
    return InputError(
        f"{what} {display(path)} cannot be loaded safely ({reason(err)})",
        "it may be damaged, or not a torch.save file; re-save it as tensors or a state_dict",
    )


# --- models -------------------------------------------------------------------------------------
def import_object(spec: str, pythonpath: Sequence[str] = ()) -> Any:
    """`package.module:attr` -> the attribute, with --pythonpath DIRs on sys.path."""
    if ":" not in spec:
        raise UsageError(f"--arch {spec!r} is not of the form package.module:factory", None)
    mod_name, _, attr = spec.partition(":")
    _extend_path(pythonpath)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(
            f"cannot import {mod_name!r} for --arch ({e})",
            "add its folder with --pythonpath DIR",
        ) from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}", None)
        obj = getattr(obj, part)
    return obj


def _extend_path(pythonpath: Sequence[str]) -> None:
    for d in pythonpath:
        p = str(Path(d).resolve())
        if p not in sys.path:
            sys.path.insert(0, p)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from `.safetensors` or a `.pt/.pth` (also nested under "state_dict" etc.)."""
    _check_file(path, "model")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(
                f"{display(path)} is a safetensors file but the safetensors package is not "
                "installed",
                "pip install 'bn-diff[safetensors]'",
            ) from None
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise InputError(
                f"model {display(path)} is not a readable safetensors file ({reason(e)})",
                "it may be truncated or corrupted; re-save it",
            ) from None
    obj = _torch_load_safe(path, "model")
    sd = _as_state_dict(obj)
    if sd is None:
        raise InputError(
            f"model {display(path)} holds a {type(obj).__name__}, not a state_dict",
            "save model.state_dict()",
        )
    return sd


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for k in STATE_DICT_KEYS:
            inner = obj.get(k)
            sd = _as_state_dict(inner) if isinstance(inner, Mapping) else None
            if sd is not None:
                return sd
    return None


def load_model(
    path: Path,
    *,
    arch: str | None = None,
    trust: bool = False,
    imports: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
) -> nn.Module:
    """The model a MODEL argument names: state_dict + --arch factory, or a trusted pickled module."""
    path = Path(path)
    if arch is not None:
        sd = load_state_dict(path)
        factory = import_object(arch, pythonpath)
        if not callable(factory):
            raise UsageError(f"--arch {arch} is a {type(factory).__name__}, not a factory", None)
        try:
            model = factory()
        except Exception as e:  # the user's own factory code
            raise ModelError(
                f"--arch {arch} raised {type(e).__name__}: {reason(e)}", None
            ) from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
        _strict_load(model, sd, path)
        return model
    _check_file(path, "model")
    if path.suffix == ".safetensors":
        raise UsageError(
            f"{display(path)} holds weights only; bn-diff needs the architecture too",
            "pass --arch package.module:factory",
        )
    _extend_path(pythonpath)
    for mod in imports:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise UsageError(
                f"--import {mod} failed ({e})", "add its folder with --pythonpath"
            ) from None
    if trust:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError) as e:
            raise InputError(
                f"model {display(path)} needs code that cannot be found ({reason(e)})",
                "pass --import MODULE and/or --pythonpath DIR so its classes can be imported",
            ) from None
        except Exception as e:  # --trust: the file's own code may raise anything
            raise _not_readable(path, "model", e) from None
    else:
        obj = _torch_load_safe(path, "model")
    if isinstance(obj, torch.jit.ScriptModule):
        raise InputError(
            f"model {display(path)} is a TorchScript module; bn-diff hooks eager modules, and "
            "TorchScript does not run Python hooks",
            "save the eager model (torch.save(model)) or its state_dict and pass --arch",
        )
    if isinstance(obj, nn.Module):
        return obj
    if _as_state_dict(obj) is not None:
        raise UsageError(
            f"{display(path)} is a state_dict, not a model",
            "pass --arch package.module:factory to build the model it belongs to",
        )
    raise InputError(
        f"model {display(path)} holds a {type(obj).__name__}, not an nn.Module",
        "save the model with torch.save(model, path), or its state_dict with --arch",
    )


def _strict_load(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                "unexpected " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            )
        raise InputError(
            f"state_dict {display(path)} does not fit the --arch model: " + "; ".join(parts),
            "check that --arch builds the architecture these weights were saved from",
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise InputError(
            f"state_dict {display(path)}: {k} has shape {tuple(sd[k].shape)}, the model expects "
            f"{tuple(own[k].shape)}",
            "check --arch",
        )
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:  # e.g. a dtype that cannot be copied
        raise InputError(
            f"state_dict {display(path)} does not load into the --arch model ({reason(e)})",
            "check --arch and the file",
        ) from None


# --- inputs -------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(
            f"--input-shape {text!r} is not a list of integers", "e.g. 8,3,224,224"
        ) from None
    if not shape or any(s < 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} is not a valid shape", "e.g. 8,3,224,224")
    if math.prod(shape) * 4 > memory_budget():  # exact: a 400-digit size must not overflow
        raise UsageError(f"--input-shape {text} is too large", None)
    return shape


def synthetic_input(shape: tuple[int, ...], seed: int = 0) -> Inputs:
    try:
        g = torch.Generator().manual_seed(seed)
    except (RuntimeError, ValueError, OverflowError):
        raise UsageError(f"--seed {seed} is out of range", "use a seed in 0 .. 2**64-1") from None
    return Inputs(
        (torch.randn(shape, generator=g),), {}, f"synthetic normal {list(shape)}, seed {seed}"
    )


def load_inputs(path: Path) -> Inputs:
    """INPUT: `.pt` (tensor, tuple/list, or dict of tensors), `.npy`, or `.npz`."""
    path = Path(path)
    _check_file(path, "input")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        inp = Inputs((npy_tensor(path),), {}, display(path))
    elif suffix == ".npz":
        inp = Inputs(tuple(npz_tensors(path).values()), {}, display(path))
    else:
        inp = _as_inputs(_torch_load_safe(path, "input"), path)
    _check_logical_size(inp, path)
    return inp


def _as_inputs(obj: Any, path: Path) -> Inputs:
    if isinstance(obj, torch.Tensor):
        return Inputs((obj,), {}, display(path))
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return Inputs(tuple(obj), {}, display(path))
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return Inputs((), dict(obj), display(path))
    raise InputError(
        f"input {display(path)} holds a {type(obj).__name__}, not a tensor or a tuple/list/dict "
        "of tensors",
        "save the input with torch.save(tensor, path)",
    )


def _check_logical_size(inp: Inputs, path: Path) -> None:
    """A saved view with zero strides can claim far more elements than its storage holds; the
    model's forward would then allocate for the claim. Refuse claims beyond the memory budget."""
    budget = memory_budget()
    for t in inp.tensors():
        nbytes = math.prod(t.shape) * t.element_size()
        if nbytes > budget:
            raise InputError(
                f"input {display(path)} holds a tensor of shape {tuple(t.shape)} ({nbytes} bytes), "
                f"more than the {budget} bytes bn-diff allows",
                "use a smaller batch",
            )
