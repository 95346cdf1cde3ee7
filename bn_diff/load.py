"""Checkpoints and tensors from disk, safe by default.

Nothing here runs code from a file unless the user said `--trust`: tensors and state_dicts go
through `torch.load(weights_only=True)`, numpy files through `allow_pickle=False` after their header
has been checked against the file size, safetensors through its own parser.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError, UsageError

MAX_INPUT_BYTES = 16 << 30
"""Refuse inputs whose header claims more than this (a hostile header should not allocate)."""

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
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist", "check the path") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read: {e.strerror}", "check the path") from None
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file", "pass the file inside it")
    if st.st_size == 0:
        raise InputError(f"{what} {path} is empty", "re-save it; the file has no bytes")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permission denied)", "check its mode")


def _torch_load_safe(path: Path, what: str) -> Any:
    """`torch.load(weights_only=True)` with one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe(path, what, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{what} {path} is not a readable PyTorch file ({first[:160]})",
            "it may be truncated or corrupted; re-save it with torch.save",
        ) from None


def _unsafe(path: Path, what: str, err: Exception) -> InputError:
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        names = []
    if names:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return InputError(
            f"{what} {path} is a pickle that needs classes {shown}; unpickling can run code, "
            "so bn-diff refuses it",
            "pass --trust if you trust this file, or save a state_dict and pass --arch "
            "package.module:factory",
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(
        f"{what} {path} cannot be loaded safely ({first[:160]})",
        "pass --trust if you trust this file, or re-save it as tensors / a state_dict",
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
                f"{path} is a safetensors file but the safetensors package is not installed",
                "pip install 'bn-diff[safetensors]'",
            ) from None
        try:
            return dict(load_file(str(path)))
        except Exception as e:
            raise InputError(f"model {path} is not a readable safetensors file ({e})", None) from None
    obj = _torch_load_safe(path, "model")
    sd = _as_state_dict(obj)
    if sd is None:
        raise InputError(
            f"model {path} holds a {type(obj).__name__}, not a state_dict", "save model.state_dict()"
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
        model = factory()
        if not isinstance(model, nn.Module):
            raise UsageError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
        _strict_load(model, sd, path)
        return model
    _check_file(path, "model")
    if path.suffix == ".safetensors":
        raise UsageError(
            f"{path} holds weights only; bn-diff needs the architecture too",
            "pass --arch package.module:factory",
        )
    _extend_path(pythonpath)
    for mod in imports:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise UsageError(f"--import {mod} failed ({e})", "add its folder with --pythonpath") from None
    if trust:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError) as e:
            raise InputError(
                f"model {path} needs code that cannot be found ({e})",
                "pass --import MODULE and/or --pythonpath DIR so its classes can be imported",
            ) from None
        except Exception as e:
            raise InputError(f"model {path} is not a readable PyTorch file ({e})", None) from None
    else:
        obj = _torch_load_safe(path, "model")
    if isinstance(obj, nn.Module):
        return obj
    if _as_state_dict(obj) is not None:
        raise UsageError(
            f"{path} is a state_dict, not a model",
            "pass --arch package.module:factory to build the model it belongs to",
        )
    raise InputError(f"model {path} holds a {type(obj).__name__}, not an nn.Module", None)


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
            f"state_dict {path} does not fit the --arch model: " + "; ".join(parts),
            "check that --arch builds the architecture these weights were saved from",
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise InputError(
            f"state_dict {path}: {k} has shape {tuple(sd[k].shape)}, the model expects "
            f"{tuple(own[k].shape)}",
            "check --arch",
        )
    model.load_state_dict(sd, strict=True)


# --- inputs -------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", "e.g. 8,3,224,224") from None
    if not shape or any(s < 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} is not a valid shape", "e.g. 8,3,224,224")
    if int(np.prod(shape, dtype=np.float64)) * 4 > MAX_INPUT_BYTES:
        raise UsageError(f"--input-shape {text} is too large", None)
    return shape


def synthetic_input(shape: tuple[int, ...], seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return Inputs((torch.randn(shape, generator=g),), {}, f"synthetic normal {list(shape)}, seed {seed}")


def load_inputs(path: Path) -> Inputs:
    """INPUT: `.pt` (tensor, tuple/list, or dict of tensors), `.npy`, or `.npz`."""
    path = Path(path)
    _check_file(path, "input")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return Inputs((_npy(path),), {}, str(path))
    if suffix == ".npz":
        return Inputs(tuple(_npz(path).values()), {}, str(path))
    obj = _torch_load_safe(path, "input")
    return _as_inputs(obj, path)


def _as_inputs(obj: Any, path: Path) -> Inputs:
    if isinstance(obj, torch.Tensor):
        return Inputs((obj,), {}, str(path))
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return Inputs(tuple(obj), {}, str(path))
    if isinstance(obj, Mapping) and obj and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return Inputs((), dict(obj), str(path))
    raise InputError(
        f"input {path} holds a {type(obj).__name__}, not a tensor or a tuple/list/dict of tensors",
        "save the input with torch.save(tensor, path)",
    )


def _npy_header(f: Any, path: Path) -> tuple[tuple[int, ...], np.dtype[Any]]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, SyntaxError, EOFError) as e:
        raise InputError(f"input {path} is not a valid .npy file ({e})", None) from None
    if dtype.hasobject:
        raise InputError(
            f"input {path} holds Python objects; loading them would unpickle",
            "save a numeric array",
        )
    return tuple(shape), dtype


def _check_size(shape: tuple[int, ...], dtype: np.dtype[Any], avail: int, path: Path) -> None:
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if nbytes > MAX_INPUT_BYTES or nbytes > avail:
        raise InputError(
            f"input {path}: header claims {shape} {dtype} ({nbytes} bytes) but the file holds "
            f"{avail} bytes",
            "the file is truncated or forged; re-save it",
        )


def _npy(path: Path) -> torch.Tensor:
    with open(path, "rb") as f:
        shape, dtype = _npy_header(f, path)
        _check_size(shape, dtype, path.stat().st_size - f.tell(), path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"input {path} is not a valid .npy file ({e})", None) from None
    return _to_tensor(arr, path)


def _npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"input {path} is not a valid .npz file ({e})", None) from None
    out: dict[str, torch.Tensor] = {}
    with zf:
        infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        if not infos:
            raise InputError(f"input {path} holds no arrays", None)
        for info in infos:
            if info.file_size > MAX_INPUT_BYTES:
                raise InputError(f"input {path}: member {info.filename} is too large", None)
            if info.compress_size and info.file_size / info.compress_size > 1000:
                raise InputError(
                    f"input {path}: member {info.filename} expands {info.file_size // info.compress_size}x; "
                    "refusing a likely zip bomb",
                    None,
                )
            try:
                with zf.open(info) as f:
                    shape, dtype = _npy_header(f, path)
                    _check_size(shape, dtype, info.file_size - f.tell(), path)
                    arr = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise InputError(f"input {path}: member {info.filename} is unreadable ({e})", None) from None
            out[info.filename[: -len(".npy")]] = _to_tensor(arr, path)
    return out


def _to_tensor(arr: np.ndarray[Any, Any], path: Path) -> torch.Tensor:
    if arr.dtype.kind not in "fiub" and arr.dtype != np.float16:
        raise InputError(f"input {path} has dtype {arr.dtype}, not a number type", None)
    try:
        return torch.from_numpy(np.ascontiguousarray(arr))
    except TypeError as e:
        raise InputError(f"input {path}: {e}", None) from None
