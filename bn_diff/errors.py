"""One exception root and the exit codes every command uses.

User errors (`BnDiffError` and subclasses) are shown as one line with a hint; anything else is a
bug and keeps its traceback (exit code 4).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in README and `bn-diff --help`."""

    OK = 0
    """Every checked layer agrees (and no finding reached --fail-on)."""
    MISMATCH = 1
    """At least one layer mismatches, or a check failed."""
    USAGE = 2
    """Bad command line: unknown option, conflicting flags, unknown layer."""
    BAD_INPUT = 3
    """Unreadable, malformed or unsafe input file."""
    INTERNAL = 4
    """A bug in bn-diff: the traceback is shown."""


class BnDiffError(Exception):
    """A user-facing error: one line of message, one line of hint, an exit code."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(BnDiffError):
    """The command line asks for something that cannot be done (exit 2)."""

    exit_code = ExitCode.USAGE


class InputError(BnDiffError):
    """A file is missing, unreadable, malformed, or unsafe to load (exit 3)."""

    exit_code = ExitCode.BAD_INPUT


class ModelError(BnDiffError):
    """The model cannot run on the given input (shape, dtype, train-mode batch of one) (exit 3)."""

    exit_code = ExitCode.BAD_INPUT
