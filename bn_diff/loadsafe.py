"""Pre-flight checks for files that may be hostile, used by `load` before any parser sees them.

What a file could do to bn-diff, and what stops it here:
- be something other than a regular file (FIFO, /dev/zero, a directory): `check_regular_file`
  refuses it before anything reads it (a FIFO would block, /dev/zero would never end);
- be a zip archive (.pt, .npz) whose members claim more bytes than memory holds, or expand at an
  absurd ratio (a zip bomb): `check_archive` reads only the central directory and refuses it;
- be a pickle that needs arbitrary classes: `pickle_globals` lists them without unpickling anything
  (it only disassembles opcodes), so the refusal can name them;
- raise a long multi-line message from a third-party parser: `reason` makes it one short line.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from .errors import InputError

MAX_INPUT_BYTES = 16 << 30
"""Refuse inputs whose header claims more than this (a hostile header should not allocate)."""

MAX_RATIO = 1000
"""Refuse zip members that expand more than this many times (zeros deflate at most ~1030x)."""

MAX_PICKLE_SCAN = 64 << 20
"""Disassemble at most this many bytes of a pickle to name its classes."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){1,12}")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WEIGHTS_ONLY = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\s+Check the documentation|$)", re.S)


def memory_budget() -> int:
    """The most bytes one input may claim: MAX_INPUT_BYTES, or half the physical memory if less."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MAX_INPUT_BYTES
    return min(MAX_INPUT_BYTES, phys // 2) if phys > 0 else MAX_INPUT_BYTES


def reason(err: BaseException, limit: int = 160) -> str:
    """An exception message as one short line: no terminal escapes, no boilerplate after the
    first sentence, at most `limit` characters."""
    text = _ANSI.sub("", str(err))
    m = _WEIGHTS_ONLY.search(text)
    if m:  # torch's weights_only refusal: the useful part is at the end of a long paragraph
        text = m.group(1)
    text = " ".join(text.split())
    cut = text.find(". ", 20)
    if cut > 0:
        text = text[:cut]
    text = text.rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(err).__name__


def display(path: Path | str) -> str:
    """A path as text that any terminal can show (undecodable bytes as \\xNN escapes)."""
    raw = os.fsencode(str(path))
    return raw.decode("utf-8", errors="backslashreplace")


def check_regular_file(path: Path, what: str) -> os.stat_result:
    """The file's stat, or one line saying why it cannot be read (missing, loop, not a file...)."""
    shown = display(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} {shown} does not exist", "check the path") from None
    except OSError as e:
        raise InputError(f"{what} {shown} cannot be read: {e.strerror}", "check the path") from None
    except ValueError as e:  # e.g. an embedded NUL byte in the path
        raise InputError(f"{what} {shown} is not a valid path ({e})", "check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} {shown} is a directory, not a file", "pass the file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{what} {shown} is not a regular file (a FIFO, socket or device)",
            "save the data to a file and pass that",
        )
    if st.st_size == 0:
        raise InputError(f"{what} {shown} is empty", "re-save it; the file has no bytes")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {shown} is not readable (permission denied)", "check its mode")
    return st


def is_zip(path: Path) -> bool:
    """Starts like a zip archive (what torch.load and np.load test too)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def check_archive(zf: zipfile.ZipFile, path: Path, what: str) -> None:
    """Refuse a zip whose members claim more than memory holds or expand like a zip bomb.

    Reads only the central directory, never a member.
    """
    shown = display(path)
    budget = memory_budget()
    total = 0
    for info in zf.infolist():
        total += info.file_size
        if info.file_size > budget or total > budget:
            raise InputError(
                f"{what} {shown}: member {info.filename} would expand to {total} bytes in all, "
                f"more than the {budget} bytes bn-diff allows",
                "the archive is forged, or too large for this machine",
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise InputError(
                    f"{what} {shown}: stored member {info.filename} claims {info.file_size} bytes "
                    f"but holds {info.compress_size}",
                    "the archive is truncated or forged; re-save it",
                )
        elif info.file_size > MAX_RATIO * max(info.compress_size, 1):
            ratio = info.file_size // max(info.compress_size, 1)
            raise InputError(
                f"{what} {shown}: member {info.filename} expands {ratio}x; refusing a likely zip "
                "bomb",
                "re-save it without compression",
            )


def open_archive(path: Path, what: str) -> zipfile.ZipFile:
    """A checked ZipFile, or one line saying why not."""
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # zipfile raises BadZipFile, OSError, ValueError, struct.error...
        raise InputError(
            f"{what} {display(path)} is not a valid zip archive ({reason(e)})",
            "it may be truncated or corrupted; re-save it",
        ) from None
    try:
        check_archive(zf, path, what)
    except BaseException:
        zf.close()
        raise
    return zf


def _pickle_streams(path: Path) -> Iterable[IO[bytes]]:
    """The pickle(s) to scan: data.pkl of a torch zip, else the file itself (legacy format)."""
    if is_zip(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith("data.pkl") and info.file_size <= MAX_PICKLE_SCAN:
                    yield io.BytesIO(zf.read(info))
        return
    with open(path, "rb") as f:
        yield io.BytesIO(f.read(MAX_PICKLE_SCAN))


_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}


_PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
"""Protocol-2 pickles spell some modules the Python 2 way; show the name Python 3 imports."""


def _globals_in(stream: IO[bytes], found: list[str], max_pickles: int = 8) -> None:
    """Append the `module.name` globals of the pickles in `stream` (opcodes only, nothing runs)."""
    for _ in range(max_pickles):
        memo: dict[int, str | None] = {}
        strings: list[str] = []
        top: str | None = None
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("GLOBAL", "INST") and isinstance(arg, str):
                module, _, attr = arg.partition(" ")
                found.append(f"{_PY2_NAMES.get(module, module)}.{attr}")
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if name in _STRING_OPS and isinstance(arg, (str, bytes)):
                top = arg if isinstance(arg, str) else arg.decode("latin-1")
                strings.append(top)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int):
                memo[arg] = top
            elif name == "MEMOIZE":
                memo[len(memo)] = top
            elif name in ("GET", "BINGET", "LONG_BINGET") and isinstance(arg, int):
                top = memo.get(arg)
                if top is not None:
                    strings.append(top)
            else:
                top = None
        if not stream.read(1):
            return
        stream.seek(-1, io.SEEK_CUR)


def pickle_globals(path: Path) -> list[str]:
    """Classes and functions a pickle would import, found by disassembly; torch's allowed ones
    (tensors, OrderedDict...) left out. Best effort: [] when the bytes are not a readable pickle."""
    found: list[str] = []
    try:
        for stream in _pickle_streams(path):
            _globals_in(stream, found)
    except Exception:  # hostile or truncated bytes: keep what was found before the damage
        pass
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # a private torch API: without it, name everything found
        allowed = set()
    # a damaged pickle can hold any bytes where a name should be: keep only importable spellings
    return list(dict.fromkeys(n for n in found if n not in allowed and _NAME.fullmatch(n)))
