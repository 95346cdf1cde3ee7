"""Fuzzing the loaders with mutated valid files (Hypothesis, derandomized, bounded).

Every format bn-diff reads starts valid (hardening_support.write_valid) and gets 1-4 mutations:
bit flips, byte overwrites, 32-bit "interesting" integers written over length fields, cuts,
insertions, deletions, duplicated runs. For zip-based formats (.pt, .npz) the mutation can also go
*inside* a member (data.pkl, x.npy) with the archive rebuilt around it, so that the damage reaches
torch's unpickler and numpy's header parser instead of being caught by a CRC.

The property: a loader returns, or raises BnDiffError. Anything else (exit 4 in the CLI) fails.
Memory is bounded too: the process's peak RSS may not grow by more than 512 MiB over the campaign.
"""

from __future__ import annotations

import atexit
import io
import os
import resource
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
from hardening_support import (
    ARCH,
    KINDS,
    assert_clean_outcome,
    command_for,
    run_cli,
    write_valid,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bn_diff.errors import BnDiffError
from bn_diff.load import load_inputs, load_model

SCALE = max(1, int(os.environ.get("BN_DIFF_FUZZ_SCALE", "1")))
"""CI runs the default (300 examples in all); BN_DIFF_FUZZ_SCALE=20 runs a longer campaign."""
LOADER_EXAMPLES = 200 * SCALE
CLI_EXAMPLES = 100 * SCALE

_TMP = Path(tempfile.mkdtemp(prefix="bn-diff-fuzz-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
VALID = write_valid(_TMP / "valid")
VALID_BYTES = {k: p.read_bytes() for k, p in VALID.items()}
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
ZIP_MEMBER = {
    "module.pt": "data.pkl",
    "state_dict.pt": "data.pkl",
    "tensor.pt": "data.pkl",
    "input.npz": "x.npy",
}

position = st.one_of(st.floats(0, 1), st.floats(0, 0.05), st.floats(0.95, 1))
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(0, 7)),
    st.tuples(st.just("set"), position, st.integers(0, 255)),
    st.tuples(st.just("int32"), position, st.sampled_from(INTERESTING)),
    st.tuples(st.just("cut"), position, st.just(0)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), position, st.integers(1, 64)),
    st.tuples(st.just("dup"), position, st.integers(1, 64)),
)


def mutate(data: bytes, muts: list[tuple[str, float, object]]) -> bytes:
    b = bytearray(data)
    for op, frac, arg in muts:
        if not b:
            break
        i = min(int(frac * len(b)), len(b) - 1)
        if op == "flip":
            b[i] ^= 1 << int(arg)  # type: ignore[call-overload]
        elif op == "set":
            b[i] = int(arg)  # type: ignore[call-overload]
        elif op == "int32":
            b[i : i + 4] = struct.pack("<I", int(arg))  # type: ignore[call-overload]
        elif op == "cut":
            del b[max(i, 1) :]
        elif op == "insert":
            b[i:i] = bytes(arg)  # type: ignore[call-overload]
        elif op == "delete":
            del b[i : i + int(arg)]  # type: ignore[call-overload]
        elif op == "dup":
            b[i:i] = b[i : i + int(arg)]  # type: ignore[call-overload]
    return bytes(b)


def mutate_member(data: bytes, member_suffix: str, muts: list[tuple[str, float, object]]) -> bytes:
    """Mutate one member of a zip archive and rebuild the archive (valid CRCs and sizes)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            content = src.read(info)
            if info.filename.endswith(member_suffix):
                content = mutate(content, muts)
            dst.writestr(info, content)
    return out.getvalue()


def make_file(kind: str, muts: list[tuple[str, float, object]], inside: bool, n: int) -> Path:
    data = VALID_BYTES[kind]
    if inside and kind in ZIP_MEMBER:
        data = mutate_member(data, ZIP_MEMBER[kind], muts)
    else:
        data = mutate(data, muts)
    path = _TMP / f"fuzz{n}-{kind}"
    path.write_bytes(data)
    return path


_count = {"loader": 0, "cli": 0}


@settings(
    max_examples=LOADER_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    kind=st.sampled_from(KINDS),
    muts=st.lists(mutation, min_size=1, max_size=4),
    inside=st.booleans(),
    trust=st.booleans(),
)
def _fuzz_loaders(
    kind: str, muts: list[tuple[str, float, object]], inside: bool, trust: bool
) -> None:
    _count["loader"] += 1
    path = make_file(kind, muts, inside, _count["loader"])
    try:
        if kind == "module.pt":
            load_model(path, trust=trust)
        elif kind in ("state_dict.pt", "model.safetensors"):
            load_model(path, arch=ARCH[1], pythonpath=[ARCH[3]])
        else:
            load_inputs(path)
    except BnDiffError as e:
        assert e.exit_code in (2, 3)
        assert "\n" not in e.message and (e.hint is None or "\n" not in e.hint)
    finally:
        path.unlink()


def test_loaders_return_or_raise_bndifferror_only() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _fuzz_loaders()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert _count["loader"] >= LOADER_EXAMPLES
    print(f"loader fuzz: {_count['loader']} examples, peak RSS growth {grown_kib} KiB")
    assert grown_kib < 512 * 1024, f"peak RSS grew by {grown_kib} KiB"


@settings(
    max_examples=CLI_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    kind=st.sampled_from(KINDS),
    muts=st.lists(mutation, min_size=1, max_size=3),
    inside=st.booleans(),
    trust=st.booleans(),
)
def _fuzz_cli(kind: str, muts: list[tuple[str, float, object]], inside: bool, trust: bool) -> None:
    _count["cli"] += 1
    path = make_file(kind, muts, inside, _count["cli"])
    try:
        o = run_cli(*command_for(kind, path, VALID, trust=trust))
        assert_clean_outcome(o, (0, 1, 3))
    finally:
        path.unlink()


def test_cli_on_mutated_files_never_exit_4_never_traceback() -> None:
    """The whole `run` (load, forward, check, render) on mutated files: exit 0, 1 or 3 only."""
    _fuzz_cli()
    assert _count["cli"] >= CLI_EXAMPLES
    print(f"CLI fuzz: {_count['cli']} examples")


@pytest.mark.parametrize("kind", KINDS)
def test_mutation_reaches_the_parser(kind: str) -> None:
    """The fuzzer is not vacuous: for every format some mutation makes the loader refuse."""
    refused = 0
    for i, frac in enumerate((0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)):
        path = make_file(kind, [("int32", frac, 0xFFFFFFFF)], inside=False, n=1000 + i)
        try:
            if kind in ("state_dict.pt", "model.safetensors"):
                load_model(path, arch=ARCH[1], pythonpath=[ARCH[3]])
            elif kind == "module.pt":
                load_model(path, trust=True)
            else:
                load_inputs(path)
        except BnDiffError:
            refused += 1
        finally:
            path.unlink()
    assert refused > 0
