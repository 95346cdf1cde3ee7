"""Foreign outputs to diagnose (`--reference`): load them safely, match them to layers and layouts.

A reference is keyed by qualified module name ("layer1.0.bn1") and holds that layer's output
from the user's own code; a conv's output may be given too (keyed by the conv's name). Accepted:
`.npz`, a `.pt` dict of tensors (`torch.load(weights_only=True)`), a directory of `.npy` files, or
one tensor (`.npy` / `.pt` / one-array `.npz`) plus `--reference-layer NAME`. Numpy files never
unpickle (`allow_pickle=False`) and their headers are checked against the file size first.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, UsageError
from .load import _check_file, _torch_load_safe
from .load_numpy import check_size, npy_header, npy_tensor
from .loadsafe import display, open_archive, reason

LAYOUTS = ("nchw", "nhwc", "auto")


@dataclass(frozen=True)
class Reference:
    """Foreign tensors by qualified layer name, and how to read their layout."""

    tensors: Mapping[str, torch.Tensor]
    """Loaded on access for .npz and .npy directories (one layer in memory at a time)."""
    source: str
    layout: str = "auto"
    """nchw, nhwc (channels-last, moved to axis 1 before diagnosis) or auto (whatever fits)."""

    def get(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        hit = self.tensors.get(name)
        if hit is None and name.endswith("#1"):
            hit = self.tensors.get(name[:-2])
        return hit


class Arrays(Mapping[str, torch.Tensor]):
    """Arrays read on access: every header is checked up front, the data only when a layer runs."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._loaders = loaders

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._loaders[key]()

    def __contains__(self, key: object) -> bool:
        return key in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def load_reference(path: Path, layer: str | None = None, layout: str = "auto") -> Reference:
    """Read a reference file or directory; one-line errors (exit 3) for anything unreadable."""
    if layout not in LAYOUTS:
        raise UsageError(f"--reference-layout must be nchw, nhwc or auto, not {layout!r}")
    path = Path(path)
    if path.is_dir():
        tensors = _npy_dir(path)
    else:
        _check_file(path, "reference")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            tensors = {"": _npy(path)}
        elif suffix == ".npz":
            tensors = _npz(path)
        else:
            tensors = _pt(path)
    if layer is not None:
        found = tensors
        if "" in found or len(found) == 1:
            tensors = Arrays({layer: partial(found.__getitem__, next(iter(found)))})
        elif layer in found:
            tensors = Arrays({layer: partial(found.__getitem__, layer)})
        else:
            raise UsageError(
                f"--reference-layer {layer!r} is not among the {len(tensors)} arrays in {path}",
                "keys: " + ", ".join(sorted(tensors)[:8]),
            )
    elif "" in tensors:
        raise UsageError(
            f"reference {path} holds a single tensor: name its layer with --reference-layer NAME",
            "e.g. --reference-layer layer1.0.bn1 (`bn-diff layers MODEL` lists the names)",
        )
    return Reference(tensors, str(path), layout)


def _npy_dir(path: Path) -> Mapping[str, torch.Tensor]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
    if not files:
        raise InputError(
            f"reference directory {path} holds no .npy files", "save one .npy per layer"
        )
    for p in files:
        _check_npy(p)
    return Arrays({p.name[: -len(".npy")]: partial(_npy, p) for p in files})


def _header(f: Any, path: Path, avail: int) -> None:
    """Check a .npy header (of a file or an archive member) before anything is allocated."""
    shown = display(path)
    shape, dtype = npy_header(f, shown, "reference")
    if dtype.kind not in "fiu":
        raise InputError(f"reference {shown} has dtype {dtype}, not a number type", None)
    check_size(shape, dtype, avail - f.tell(), shown, "reference")


def _check_npy(path: Path) -> None:
    _check_file(path, "reference")
    with open(path, "rb") as f:
        _header(f, path, path.stat().st_size)


def _npy(path: Path) -> torch.Tensor:
    _check_npy(path)
    return _tensor(npy_tensor(path, "reference").numpy(), path)


def _npz(path: Path) -> Mapping[str, torch.Tensor]:
    """Headers checked now (zip bombs refused from the central directory); arrays read lazily."""
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    with open_archive(path, "reference") as zf:
        infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        if not infos:
            raise InputError(f"reference {display(path)} holds no arrays", None)
        for info in infos:
            try:
                with zf.open(info) as f:
                    _header(f, path, info.file_size)
            except InputError:
                raise
            except Exception as e:  # zipfile on damaged bytes: BadZipFile, CRC, EOF...
                raise InputError(
                    f"reference {display(path)}: member {info.filename} is unreadable "
                    f"({reason(e)})",
                    None,
                ) from None
            loaders[info.filename[: -len(".npy")]] = partial(_npz_member, path, info.filename)
    return Arrays(loaders)


def _npz_member(path: Path, member: str) -> torch.Tensor:
    try:
        with open_archive(path, "reference") as zf, zf.open(member) as f:
            arr = np.lib.format.read_array(f, allow_pickle=False)
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"reference {display(path)}: member {member} is unreadable ({reason(e)})", None
        ) from None
    return _tensor(arr, path)


def _pt(path: Path) -> dict[str, torch.Tensor]:
    obj = _torch_load_safe(path, "reference")
    if isinstance(obj, torch.Tensor):
        return {"": obj.detach()}
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return {k: v.detach() for k, v in obj.items()}
    raise InputError(
        f"reference {path} holds a {type(obj).__name__}, not a tensor or a dict of tensors by "
        "layer name",
        "torch.save({'layer1.0.bn1': tensor, ...}, path)",
    )


def _tensor(arr: np.ndarray[Any, Any], path: Path) -> torch.Tensor:
    if arr.dtype.kind not in "fiu":
        raise InputError(f"reference {path} has dtype {arr.dtype}, not a number type", None)
    return torch.from_numpy(np.ascontiguousarray(arr))


def check_names(ref: Reference, bn_names: Iterable[str], conv_names: Iterable[str]) -> None:
    """Every key must name a BN layer (or its k-th call, "name#k") or a conv layer of the model."""
    bns, convs = list(bn_names), list(conv_names)
    known = set(bns) | set(convs)
    for key in ref.tensors:
        if key in known or key.split("#")[0] in set(bns):
            continue
        close = difflib.get_close_matches(key, bns + convs, n=3, cutoff=0.5)
        shown = ", ".join(bns[:6]) + (", ..." if len(bns) > 6 else "")
        raise InputError(
            f"reference key {key!r} names no BatchNorm or conv layer of the model "
            f"(BatchNorm layers: {shown or 'none'})",
            ("did you mean " + ", ".join(close) + "?")
            if close
            else "keys are qualified module names; `bn-diff layers MODEL` lists them",
        )


def nhwc_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], *shape[2:], shape[1]) if len(shape) >= 3 else shape


def layouts(
    ref: torch.Tensor, shape: tuple[int, ...], layout: str, name: str, what: str = "output"
) -> list[tuple[str, torch.Tensor]]:
    """The readings of `ref` (moved to channel-first) that fit a layer of this shape."""
    got = tuple(int(s) for s in ref.shape)
    out: list[tuple[str, torch.Tensor]] = []
    if got == shape and (layout != "nhwc" or len(shape) < 3):
        out.append(("nchw", ref))
    if len(shape) >= 3 and layout != "nchw" and got == nhwc_shape(shape):
        out.append(("nhwc", ref.movedim(-1, 1)))
    if not out:
        wants = [f"{shape} (NCHW)"] if layout != "nhwc" or len(shape) < 3 else []
        if len(shape) >= 3 and layout != "nchw":
            wants.append(f"{nhwc_shape(shape)} (NHWC)")
        want = " or ".join(wants)
        raise InputError(
            f"reference {name!r} has shape {got}, but the layer's {what} has shape {want}",
            "save the tensor that layer produced for the same input, or fix --reference-layout",
        )
    return out
