"""Hostile files through the real CLI: nothing runs, nothing crashes, every refusal is one line.

The corpus (hardening_support.hostile_cases) is made by the tests: pickles whose unpickling would
run `os.system` or write a file, headers that claim 10^12 elements, object arrays, zip bombs,
forged zip directories, truncated and bit-flipped copies of every format bn-diff reads, symlink
loops, FIFOs, devices. Each goes through `bn_diff.cli.main` exactly as a user would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hardening_support import (
    ARCH,
    MARKER,
    ROOT,
    Payload,
    assert_clean_outcome,
    forged_npy,
    hostile_cases,
    npz_of,
    run_cli,
    write_valid,
    zip_bomb,
)

import bn_diff.load as load
from bn_diff.errors import InputError

CASES = hostile_cases()


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_valid(tmp_path_factory.mktemp("valid"))


def test_valid_files_of_every_format_pass(valid: dict[str, Path]) -> None:
    """The baseline the mutations start from: every valid file runs (exit 0)."""
    from hardening_support import command_for

    for kind, path in valid.items():
        o = run_cli(*command_for(kind, path, valid, trust=True))
        assert o.code == 0, (kind, o.err)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_file(
    case, valid: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # payloads with a relative marker would write it here
    argv = case.build(tmp_path, valid)
    o = run_cli(*argv)
    assert_clean_outcome(o, case.codes)
    if case.needle:
        assert case.needle in o.err, o.err
    assert not (tmp_path / MARKER).exists(), "a payload ran"


def test_payload_refusal_names_the_callable(valid: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / MARKER
    import torch

    torch.save(Payload(f"touch {marker}"), tmp_path / "evil.pt")
    o = run_cli("run", str(tmp_path / "evil.pt"), str(valid["tensor.pt"]))
    assert o.code == 3
    assert o.err.count("\n") == 1
    assert "needs classes posix.system" in o.err or "needs classes os.system" in o.err
    assert "--trust" in o.err
    assert not marker.exists()


def _subprocess(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="100")
    return subprocess.run(
        [sys.executable, "-m", "bn_diff", *args], capture_output=True, env=env, timeout=300
    )


@pytest.mark.parametrize("role", ["model", "input"])
def test_payload_through_python_m(valid: dict[str, Path], tmp_path: Path, role: str) -> None:
    """The real process, the real entry point: the marker never appears."""
    import pickle

    marker = tmp_path / MARKER
    evil = tmp_path / "evil.pt"
    if role == "model":
        import torch

        torch.save(Payload(f"touch {marker}"), evil)
        r = _subprocess("run", str(evil), str(valid["tensor.pt"]))
    else:
        evil.write_bytes(pickle.dumps(Payload(f"touch {marker}")))
        r = _subprocess("run", str(valid["state_dict.pt"]), str(evil), *ARCH)
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "system" in err and "Traceback" not in err
    assert not marker.exists()


def _peak_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["npy", "npz-stored", "npz-deflated"])
def test_huge_header_refused_before_allocating(tmp_path: Path, fmt: str) -> None:
    """10^12 claimed float32 elements: refused while the traced peak stays under 4 MiB."""
    import zipfile

    path = tmp_path / ("x.npy" if fmt == "npy" else "x.npz")
    data = forged_npy((10**6, 10**6))
    if fmt == "npy":
        path.write_bytes(data)
    else:
        method = zipfile.ZIP_STORED if fmt == "npz-stored" else zipfile.ZIP_DEFLATED
        path.write_bytes(npz_of({"x.npy": data}, method))
    assert _peak_bytes(lambda: load.load_inputs(path)) < 4 << 20


def test_zip_bomb_refused_without_inflating(tmp_path: Path) -> None:
    zip_bomb(tmp_path / "bomb.npz", "x.npy", megabytes=64)
    assert (tmp_path / "bomb.npz").stat().st_size < 1 << 20
    assert _peak_bytes(lambda: load.load_inputs(tmp_path / "bomb.npz")) < 4 << 20


def _cannot_read_as_this_user(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return False
    except PermissionError:
        return True


def test_unreadable_file_real_permissions(valid: dict[str, Path], tmp_path: Path) -> None:
    """Mode 000. Root reads such files anyway, so as root the command runs under setpriv with
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (still uid 0, but bound by the mode)."""
    locked = tmp_path / "locked.npy"
    shutil.copy(valid["input.npy"], locked)
    locked.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0 or not _cannot_read_as_this_user(locked):
        setpriv = shutil.which("setpriv")
        drop = ["--bounding-set=-dac_override,-dac_read_search"]
        if (
            setpriv is None
            or subprocess.run([setpriv, *drop, "cat", str(locked)], capture_output=True).returncode
            == 0
        ):
            pytest.skip("root reads mode-000 files, and setpriv cannot drop CAP_DAC_OVERRIDE here")
        prefix = [setpriv, *drop]
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", COLUMNS="100")
    r = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "bn_diff",
            "run",
            str(valid["state_dict.pt"]),
            str(locked),
            *ARCH,
        ],
        capture_output=True,
        env=env,
        timeout=300,
    )
    err = r.stderr.decode()
    assert r.returncode == 3, err
    assert err.count("\n") == 1 and "permission denied" in err, err


@pytest.mark.parametrize("kind", ["tensor.pt", "input.npy", "input.npz"])
def test_permission_lost_after_the_check(
    valid: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The file passes the up-front check, then opening it fails (a race, or an ACL the check
    did not see): still one line, exit 3."""
    import builtins
    import io

    target = tmp_path / kind
    shutil.copy(valid[kind], target)
    real_open = builtins.open

    def deny(file, *a, **k):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and Path(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    monkeypatch.setattr(io, "open", deny)  # zipfile opens through io.open
    o = run_cli("run", str(valid["state_dict.pt"]), str(target), *ARCH)
    assert_clean_outcome(o, (3,))
    assert "ermission denied" in o.err


def test_non_utf8_file_names(valid: dict[str, Path], tmp_path: Path) -> None:
    """Names that are not UTF-8 work, and are shown escaped (\\xff), in text, JSON and errors."""
    raw_dir = os.fsencode(str(tmp_path))
    model = raw_dir + b"/mod\xe9le.pt"
    inp = raw_dir + b"/in\xff\xfe.npy"
    shutil.copy(valid["state_dict.pt"], model)
    shutil.copy(valid["input.npy"], inp)
    r = _subprocess("run", model, inp, *ARCH)
    assert r.returncode == 0, r.stderr
    assert b"in\\xff\\xfe.npy" in r.stdout and b"mod\\xe9le.pt" in r.stdout
    r = _subprocess("run", model, inp, *ARCH, "--json", "-")
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads(r.stdout.decode("utf-8"))  # strict UTF-8: no lone surrogates
    assert report["input"].endswith("in\\xff\\xfe.npy")
    r = _subprocess("run", model, inp + b".missing", *ARCH)
    err = r.stderr.decode("utf-8")
    assert r.returncode == 3 and err.count("\n") == 1 and "in\\xff\\xfe.npy.missing" in err


def test_ascii_terminal_does_not_crash(valid: dict[str, Path]) -> None:
    """An ASCII-only locale (UTF-8 mode off): characters it lacks are escaped, not fatal."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", LC_ALL="C", PYTHONUTF8="0")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bn_diff",
            "run",
            str(valid["state_dict.pt"]),
            str(valid["input.npy"]),
            *ARCH,
        ],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr


def test_corpus_ids_are_unique() -> None:
    """Each case is counted once in the totals the README quotes."""
    assert len(CASES) == len({c.id for c in CASES})


def _arg_cases() -> list[tuple[str, list[str], int]]:
    big = "9" * 400
    return [
        ("input-shape-400-digits", ["--input-shape", big + ",3"], 2),
        ("input-shape-1e30-elements", ["--input-shape", "2,3," + "9" * 30], 2),
        ("input-shape-negative", ["--input-shape", "-1,3"], 2),
        ("input-shape-empty", ["--input-shape", ""], 2),
        ("input-shape-words", ["--input-shape", "a,b"], 2),
        ("seed-out-of-range", ["--input-shape", "2,3,4,4", "--seed", "9" * 30], 2),
        ("atol-nan", ["{x}", "--atol", "nan", "--rtol", "0"], 2),
        ("atol-rtol-inf", ["{x}", "--atol", "inf", "--rtol", "inf"], 2),
        ("atol-without-rtol", ["{x}", "--atol", "1"], 2),
        ("device-bogus", ["{x}", "--device", "bogus"], 2),
        ("device-meta", ["{x}", "--device", "meta"], 2),
        ("json-is-a-directory", ["{x}", "--json", "{dir}"], 2),
        ("json-empty-path", ["{x}", "--json", ""], 2),
        ("json-folder-missing", ["{x}", "--json", "{dir}/no/such/r.json"], 2),
        ("layer-glob-bracket", ["{x}", "--layer", "["], 2),
        ("arch-not-callable", ["{x}", "--arch", "math:pi"], 2),
        ("arch-raises", ["{x}", "--arch", "json:loads"], 3),
        ("arch-no-colon", ["{x}", "--arch", "models"], 2),
        ("arch-missing-module", ["{x}", "--arch", "no_such_module_xyz:f"], 2),
        ("arch-missing-attr", ["{x}", "--arch", "models:nope", "--pythonpath", "{examples}"], 2),
        ("import-missing", ["{x}", "--trust", "--import", "no_such_module_xyz"], 2),
    ]


ARG_CASES = _arg_cases()


@pytest.mark.parametrize("args, code", [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])
def test_hostile_arguments(
    valid: dict[str, Path], tmp_path: Path, args: list[str], code: int
) -> None:
    """Absurd values on the command line: a usage error (2) or bad input (3), one line."""
    from hardening_support import EXAMPLES

    subst = {"{x}": str(valid["tensor.pt"]), "{dir}": str(tmp_path), "{examples}": str(EXAMPLES)}
    argv = [subst.get(a, a.replace("{dir}", str(tmp_path))) for a in args]
    model = str(valid["module.pt"]) if "--trust" in argv else str(valid["state_dict.pt"])
    if "--arch" not in argv and "--trust" not in argv:
        argv += ARCH
    o = run_cli("run", model, *argv)
    assert_clean_outcome(o, (code,))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stray or half-written file


@pytest.mark.parametrize("kind", ["huge-npy", "huge-npz", "bomb-npz", "object-npz"])
def test_hostile_reference_files_refused_before_allocating(tmp_path: Path, kind: str) -> None:
    """--reference files get the same checks as inputs: one line, exit 3, nothing inflated."""
    import zipfile

    from bn_diff.reference import load_reference

    if kind == "huge-npy":
        path = tmp_path / "bn.npy"
        path.write_bytes(forged_npy((10**6, 10**6)))
    elif kind == "huge-npz":
        path = tmp_path / "theirs.npz"
        path.write_bytes(npz_of({"bn.npy": forged_npy((10**6, 10**6))}, zipfile.ZIP_DEFLATED))
    elif kind == "bomb-npz":
        path = tmp_path / "theirs.npz"
        zip_bomb(path, "bn.npy", megabytes=64)
    else:
        path = tmp_path / "theirs.npz"
        np.savez(path, bn=np.array([object()], dtype=object))
    layer = "bn" if kind == "huge-npy" else None
    assert _peak_bytes(lambda: load_reference(path, layer=layer)) < 4 << 20
