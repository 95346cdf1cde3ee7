"""The last `bn-diff run` made in a directory, so that `bn-diff explain --layer NAME` can reuse it.

`run` records its paths and loading options (never tensors) in `.bn-diff/last-run.json` of the
current directory, atomically; a directory that cannot be written to is skipped silently, since
the record is a convenience and must never fail a run. Paths are stored absolute.

`--trust` is recorded but not reused on its own: a file in the working directory (possibly one
that came with a cloned repository) must not be able to make bn-diff unpickle a model. `explain`
asks for `--trust` again when the recorded run needed it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .render.jsonout import dumps, write_atomic

SCHEMA_LAST_RUN = "bn-diff/last-run/v1"
RECORD = Path(".bn-diff") / "last-run.json"
"""Where the record lives, relative to the directory `run` was made in."""


@dataclass(frozen=True, slots=True)
class LastRun:
    """How the last `bn-diff run` loaded its model and input."""

    model: str
    """Absolute path of MODEL."""
    input: str | None
    """Absolute path of INPUT; None with --input-shape."""
    input_shape: str | None = None
    seed: int = 0
    arch: str | None = None
    trust: bool = False
    imports: tuple[str, ...] = ()
    pythonpath: tuple[str, ...] = ()
    """Absolute directories."""
    mode: str = "as-is"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["imports"] = list(self.imports)
        d["pythonpath"] = list(self.pythonpath)
        return {"schema": SCHEMA_LAST_RUN, **d}


def _abs(p: str | Path) -> str:
    return str(Path(p).expanduser().absolute())


def make(
    model: Path,
    input: Path | None,
    *,
    input_shape: str | None = None,
    seed: int = 0,
    arch: str | None = None,
    trust: bool = False,
    imports: tuple[str, ...] | list[str] = (),
    pythonpath: tuple[str, ...] | list[str] = (),
    mode: str = "as-is",
) -> LastRun:
    """A record with absolute paths, so that it still holds when read from the same directory."""
    return LastRun(
        model=_abs(model),
        input=None if input is None else _abs(input),
        input_shape=input_shape,
        seed=seed,
        arch=arch,
        trust=trust,
        imports=tuple(imports),
        pythonpath=tuple(_abs(p) for p in pythonpath),
        mode=mode,
    )


def save(record: LastRun, cwd: Path | None = None) -> bool:
    """Write the record under `cwd` (default: the current directory); False when that failed."""
    try:
        path = (cwd or Path.cwd()) / RECORD
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, dumps(record.to_json()))
    except (OSError, UsageError):
        return False
    return True


def remember(model: Path, input: Path | None, **options: Any) -> bool:
    """`make` + `save` for `bn-diff run`; never raises for want of a writable directory."""
    try:
        return save(make(model, input, **options))
    except OSError:  # e.g. the working directory was removed
        return False


def load(cwd: Path | None = None) -> LastRun:
    """The record of the last run made in `cwd`; a one-line UsageError when there is none."""
    path = (cwd or Path.cwd()) / RECORD
    hint = "pass MODEL and INPUT, or make a `bn-diff run MODEL INPUT` in this directory first"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"no MODEL and INPUT given, and no earlier `bn-diff run` in this directory ({RECORD})",
            hint,
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read {RECORD}: {e.strerror}", hint) from None
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("schema") != SCHEMA_LAST_RUN:
            raise ValueError("unknown schema")
        return LastRun(
            model=str(d["model"]),
            input=None if d.get("input") is None else str(d["input"]),
            input_shape=None if d.get("input_shape") is None else str(d["input_shape"]),
            seed=int(d.get("seed", 0)),
            arch=None if d.get("arch") is None else str(d["arch"]),
            trust=bool(d.get("trust", False)),
            imports=tuple(str(s) for s in d.get("imports", ())),
            pythonpath=tuple(str(s) for s in d.get("pythonpath", ())),
            mode=str(d.get("mode", "as-is")),
        )
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{RECORD} is not a record of bn-diff run", hint) from None


def _shown(p: str, cwd: Path) -> str:
    """A recorded absolute path, relative when it lies under `cwd` (shorter to read)."""
    rel = os.path.relpath(p, cwd)
    return p if rel.startswith("..") else rel


def reuse(
    *,
    trust: bool,
    cwd: Path | None = None,
    mode: str | None = None,
    input_shape: str | None = None,
    seed: int | None = None,
    arch: str | None = None,
    imports: tuple[str, ...] | list[str] = (),
    pythonpath: tuple[str, ...] | list[str] = (),
) -> LastRun:
    """The last run's settings, with the options given now taking precedence.

    A run that unpickled its model with --trust is reused only when --trust is given again.
    """
    here = cwd or Path.cwd()
    rec = load(here)
    if rec.trust and not trust:
        raise UsageError(
            f"the last run unpickled {_shown(rec.model, here)} with --trust; explain does not take "
            f"that permission from {RECORD}",
            "pass --trust again if you trust that file",
        )
    return replace(
        rec,
        model=_shown(rec.model, here),
        input=None if input_shape is not None or rec.input is None else _shown(rec.input, here),
        input_shape=input_shape if input_shape is not None else rec.input_shape,
        seed=rec.seed if seed is None else seed,
        arch=arch if arch is not None else rec.arch,
        trust=trust,
        imports=tuple(imports) or rec.imports,
        pythonpath=tuple(pythonpath) or rec.pythonpath,
        mode=rec.mode if mode is None else mode,
    )


def settings(
    model: Path | None,
    input: Path | None,
    *,
    trust: bool,
    mode: str | None = None,
    input_shape: str | None = None,
    seed: int | None = None,
    arch: str | None = None,
    imports: tuple[str, ...] | list[str] = (),
    pythonpath: tuple[str, ...] | list[str] = (),
) -> tuple[LastRun, bool]:
    """What `explain` loads: MODEL/INPUT and the options as given, or, without MODEL, the last
    run's (options given now win). The flag says whether the last run was reused."""
    if model is None:
        return reuse(trust=trust, mode=mode, input_shape=input_shape, seed=seed, arch=arch,
                     imports=imports, pythonpath=pythonpath), True  # fmt: skip
    given = LastRun(
        model=str(model),
        input=None if input is None else str(input),
        input_shape=input_shape,
        seed=0 if seed is None else seed,
        arch=arch,
        trust=trust,
        imports=tuple(imports),
        pythonpath=tuple(pythonpath),
        mode="as-is" if mode is None else mode,
    )
    return given, False
