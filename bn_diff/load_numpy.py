"""`.npy` and `.npz` inputs, read without unpickling and without trusting their headers.

`allow_pickle=False` everywhere; object dtypes are refused before numpy sees the body; every header
is checked against the bytes that follow it (and against the memory budget) before anything is
allocated; `.npz` archives are checked for zip bombs from the central directory first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .loadsafe import display, memory_budget, open_archive, reason


def npy_header(f: Any, shown: str, what: str = "input") -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from a .npy header; `shown` names the file (and member) in errors."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TypeError...
        raise _bad_npy(shown, e, what) from None
    if dtype.hasobject:
        raise InputError(
            f"{what} {shown} holds Python objects; loading them would unpickle, so bn-diff "
            "refuses it",
            "save a numeric array",
        )
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise InputError(f"{what} {shown}: header claims shape {shape}", "re-save it")
    return tuple(shape), dtype


def check_size(
    shape: tuple[int, ...], dtype: np.dtype[Any], avail: int, shown: str, what: str = "input"
) -> None:
    """Refuse a header whose claim the bytes after it cannot hold, before anything is allocated."""
    nbytes = math.prod(shape) * dtype.itemsize
    budget = memory_budget()
    if nbytes > budget:
        raise InputError(
            f"{what} {shown}: header claims {shape} {dtype} ({nbytes} bytes), more than the "
            f"{budget} bytes bn-diff allows",
            "the file is forged, or too large for this machine",
        )
    if nbytes > avail:
        raise InputError(
            f"{what} {shown}: header claims {shape} {dtype} ({nbytes} bytes) but the file "
            f"holds {avail} bytes",
            "the file is truncated or forged; re-save it",
        )


def npy_tensor(path: Path, what: str = "input") -> torch.Tensor:
    """A `.npy` file as a tensor, its header checked against the file size before reading."""
    shown = display(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:  # e.g. permission lost since the check
        raise InputError(f"{what} {shown} cannot be read: {e.strerror}", "check its mode") from None
    with f:
        shape, dtype = npy_header(f, shown, what)
        check_size(shape, dtype, path.stat().st_size - f.tell(), shown, what)
        f.seek(0)  # read_array parses the header itself
        try:
            arr = np.lib.format.read_array(f, allow_pickle=False)
        except Exception as e:  # what numpy raises on a damaged body
            raise _bad_npy(shown, e, what) from None
    return _to_tensor(arr, path, what)


def _bad_npy(shown: str, err: BaseException, what: str = "input") -> InputError:
    return InputError(
        f"{what} {shown} is not a valid .npy file ({reason(err)})",
        "it may be truncated or corrupted; re-save it with np.save",
    )


def npz_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Each `.npy` member, header checked against the member's size before it is read."""
    out: dict[str, torch.Tensor] = {}
    with open_archive(path, "input") as zf:  # refuses zip bombs from the central directory
        infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        if not infos:
            raise InputError(f"input {display(path)} holds no arrays", "save it with np.savez")
        for info in infos:
            shown = f"{display(path)} (member {info.filename})"
            try:
                with zf.open(info) as f:
                    shape, dtype = npy_header(f, shown)
                    check_size(shape, dtype, info.file_size - f.tell(), shown)
                with zf.open(info) as f:  # read_array parses the header itself
                    arr = np.lib.format.read_array(f, allow_pickle=False)
            except InputError:
                raise
            except Exception as e:  # zipfile and numpy on damaged bytes: BadZipFile, CRC, EOF...
                raise InputError(
                    f"input {shown} is unreadable ({reason(e)})",
                    "the archive is truncated or corrupted; re-save it",
                ) from None
            out[info.filename[: -len(".npy")]] = _to_tensor(arr, path)
    return out


def _to_tensor(arr: np.ndarray[Any, Any], path: Path, what: str = "input") -> torch.Tensor:
    if arr.dtype.kind not in "fiub":
        raise InputError(
            f"{what} {display(path)} has dtype {arr.dtype}, not a number type torch reads",
            "save a float, int or bool array",
        )
    if not arr.dtype.isnative:  # big-endian files: torch only takes native byte order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(arr))
    except (TypeError, ValueError) as e:  # a dtype torch lacks
        raise InputError(f"{what} {display(path)}: {reason(e)}", "save a float32 array") from None
