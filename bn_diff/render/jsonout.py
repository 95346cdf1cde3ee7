"""JSON output: stdout stays clean JSON, files are written atomically (temp file + rename)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UsageError


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers never see a half-written file.

    An unwritable destination is a usage error (exit 2, one line), never a traceback.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(
            fd, 0o666 & ~umask
        )  # mkstemp makes 0600; a report should be readable like any file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # disk full, target is a directory...: the old file stays
            raise _cannot_write(path, e) from None
        raise


def _cannot_write(path: Path, err: OSError) -> UsageError:
    return UsageError(
        f"cannot write {os.fsencode(path).decode('utf-8', 'backslashreplace')}: "
        f"{err.strerror or err}",
        "check that its folder exists and is writable",
    )


def write_json(obj: Any, target: str) -> None:
    """`target` is a path, or "-" for stdout."""
    text = dumps(obj)
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(Path(target), text)
