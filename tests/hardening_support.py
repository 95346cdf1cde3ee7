"""Helpers for the hardening tests: valid files of every format, hostile variants, and a CLI runner.

Not a test module (no `test_` prefix): test_hostile.py, test_fuzz_loaders.py, test_no_loss.py and
test_odd_models.py import it. Every file here is made by the tests; nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

ARCH = ["--arch", "models:forum_net", "--pythonpath", str(EXAMPLES)]
"""The factory that builds the model the state_dict files below belong to."""


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(*args: str) -> Outcome:
    """`bn-diff ARGS` in-process through the real entry point, no colour, wide terminal."""
    from bn_diff.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in ("NO_COLOR", "COLUMNS")}
    os.environ["NO_COLOR"] = "1"
    os.environ["COLUMNS"] = "100"
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_clean_outcome(o: Outcome, allowed: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """Never exit 4, never a traceback; a failure (2 or 3) is exactly one `error:` line."""
    assert o.code in allowed, (o.code, o.err[-2000:])
    assert o.code != 4
    assert "Traceback" not in o.err and "Traceback" not in o.out, o.err[-2000:]
    if o.code in (2, 3):
        lines = [ln for ln in o.err.splitlines() if ln.strip()]
        assert len(lines) == 1, o.err
        assert lines[0].startswith("error: ") or lines[0].startswith("Usage:"), o.err


# --- valid files ----------------------------------------------------------------------------------
def forum_model() -> nn.Module:
    import models

    return models.forum_net()


def input_array(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.2, 1.5, size=(4, 3, 6, 6)).astype(np.float32)


def write_valid(d: Path) -> dict[str, Path]:
    """One valid file of every format bn-diff reads, named by what it is."""
    d.mkdir(parents=True, exist_ok=True)
    model = forum_model()
    files = {
        "module.pt": d / "module.pt",  # pickled nn.Module: needs --trust
        "state_dict.pt": d / "state_dict.pt",  # with --arch
        "model.safetensors": d / "model.safetensors",  # with --arch
        "tensor.pt": d / "tensor.pt",  # input
        "input.npy": d / "input.npy",
        "input.npz": d / "input.npz",
    }
    torch.save(model, files["module.pt"])
    torch.save(model.state_dict(), files["state_dict.pt"])
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(files["model.safetensors"])
    )
    x = input_array()
    torch.save(torch.from_numpy(x), files["tensor.pt"])
    np.save(files["input.npy"], x)
    np.savez(files["input.npz"], x=x)
    return files


def command_for(kind: str, path: Path, other: dict[str, Path], trust: bool = False) -> list[str]:
    """A `bn-diff run` command line that reads `path` in the role its kind has."""
    if kind == "module.pt":
        return ["run", str(path), str(other["tensor.pt"]), *(["--trust"] if trust else [])]
    if kind in ("state_dict.pt", "model.safetensors"):
        return ["run", str(path), str(other["tensor.pt"]), *ARCH]
    return ["run", str(other["state_dict.pt"]), str(path), *ARCH]


# --- hostile files --------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs `os.system(cmd)`: the marker file appears if anything unpickles it."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.cmd,))


class WriteMarker:
    """Unpickling this calls `pathlib.Path.write_text` on the marker: a write, no shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path(self.marker).write_text, ("pwned",))


def npy_header(
    shape: tuple[int, ...], descr: str = "<f4", version: tuple[int, int] = (1, 0)
) -> bytes:
    """A .npy header (magic + dict) claiming `shape`, with no check against what follows."""
    d = {"descr": descr, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    write = (
        np.lib.format.write_array_header_1_0
        if version == (1, 0)
        else np.lib.format.write_array_header_2_0
    )
    write(buf, d)
    return buf.getvalue()


def forged_npy(shape: tuple[int, ...], payload: bytes = b"\0" * 64) -> bytes:
    return npy_header(shape) + payload


def npz_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_bomb(path: Path, name: str, megabytes: int = 64) -> None:
    """A zip member of `megabytes` MiB of zeros, deflated at level 9 (ratio ~1000:1)."""
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open(name, "w", force_zip64=True) as f:
            if name.endswith(".npy"):
                f.write(npy_header((megabytes << 18,)))
            for _ in range(megabytes):
                f.write(chunk)


def forge_zip_sizes(data: bytes, member: str, size: int) -> bytes:
    """Rewrite the uncompressed size of `member` in the central directory (a lying header)."""
    out = bytearray(data)
    sig = b"PK\x01\x02"
    pos = out.find(sig)
    while pos >= 0:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        name = bytes(out[pos + 46 : pos + 46 + name_len]).decode()
        if name == member:
            struct.pack_into("<I", out, pos + 24, size)
        pos = out.find(sig, pos + 4)
    return bytes(out)


def truncations(data: bytes) -> list[tuple[str, bytes]]:
    """Copies cut at the first byte, a tenth, the middle, and one byte short."""
    n = len(data)
    return [(f"cut{k}", data[:k]) for k in sorted({1, n // 10, n // 2, n - 1}) if 0 < k < n]


def bit_flips(data: bytes, count: int = 6) -> list[tuple[str, bytes]]:
    """Copies with one bit flipped, at fixed spread positions (deterministic)."""
    out = []
    n = len(data)
    for i in range(count):
        pos = (n * (2 * i + 1)) // (2 * count)
        b = bytearray(data)
        b[pos] ^= 1 << (i % 8)
        out.append((f"flip{pos}.{i % 8}", bytes(b)))
    return out


# --- the hostile corpus ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One hostile file (or path) and the command that feeds it to bn-diff."""

    id: str
    build: Callable[[Path, dict[str, Path]], list[str]]
    """Writes the file(s) into a fresh folder (valid files at hand) and returns the argv."""
    codes: tuple[int, ...] = (3,)
    needle: str = ""
    """Text the one error line must contain."""


def _roles(path: Path, v: dict[str, Path]) -> dict[str, list[str]]:
    """The four places a file can be handed to bn-diff."""
    return {
        "model": ["run", str(path), str(v["tensor.pt"])],
        "model+arch": ["run", str(path), str(v["tensor.pt"]), *ARCH],
        "input": ["run", str(v["state_dict.pt"]), str(path), *ARCH],
        "layers": ["layers", str(path)],
    }


def _payload_files(marker: Path) -> dict[str, Callable[[Path], None]]:
    """Files whose unpickling would run code: each writes `marker` if anything unpickles it."""
    sd = forum_model().state_dict()
    return {
        "torch.save(os.system)": lambda p: torch.save(Payload(f"touch {marker}"), p),
        "torch.save(Path.write_text)": lambda p: torch.save({"w": WriteMarker(marker)}, p),
        "state_dict+os.system": lambda p: torch.save(
            {**sd, "extra": Payload(f"touch {marker}")}, p
        ),
        "legacy-format(os.system)": lambda p: torch.save(
            Payload(f"touch {marker}"), p, _use_new_zipfile_serialization=False
        ),
        "raw-pickle-p5(os.system)": lambda p: p.write_bytes(
            pickle.dumps(Payload(f"touch {marker}"), protocol=5)
        ),
        "raw-pickle-p0(Path.write_text)": lambda p: p.write_bytes(
            pickle.dumps(WriteMarker(marker), protocol=0)
        ),
    }


PAYLOAD_NAMES = {
    "torch.save(os.system)": "system",
    "torch.save(Path.write_text)": "pathlib",
    "state_dict+os.system": "system",
    "legacy-format(os.system)": "system",
    "raw-pickle-p5(os.system)": "system",
    "raw-pickle-p0(Path.write_text)": "pathlib",
}
"""What the refusal must name: the payload's module."""

MARKER = "MARKER"
"""Payload files write a file of this name into the case folder if they are ever unpickled."""


def _payload_case(kind: str, role: str) -> Case:
    def build(d: Path, v: dict[str, Path]) -> list[str]:
        path = d / "payload.pt"
        _payload_files(d / MARKER)[kind](path)
        return _roles(path, v)[role]

    return Case(f"payload/{kind}/{role}", build, (3,), PAYLOAD_NAMES[kind])


def _write(name: str, data: Callable[[], bytes], role: str = "input") -> Callable[..., list[str]]:
    def build(d: Path, v: dict[str, Path]) -> list[str]:
        path = d / name
        path.write_bytes(data())
        return _roles(path, v)[role]

    return build


def _zip_bomb_case(name: str, member: str) -> Callable[..., list[str]]:
    def build(d: Path, v: dict[str, Path]) -> list[str]:
        zip_bomb(d / name, member, megabytes=64)
        return _roles(d / name, v)["input"]

    return build


def _forged_size(name: str, member: str, make: Callable[[], bytes]) -> Callable[..., list[str]]:
    return _write(name, lambda: forge_zip_sizes(make(), member, 0xFFFFFFF0))


def _tensor_zip() -> bytes:
    buf = io.BytesIO()
    torch.save(torch.from_numpy(input_array()), buf)
    return buf.getvalue()


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([WriteMarker(Path("MARKER"))], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _structured_object_npz() -> bytes:
    arr = np.zeros(2, dtype=[("a", "<f4"), ("b", object)])
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return npz_of({"x.npy": buf.getvalue()})


def _safetensors_forged() -> bytes:
    """A safetensors header that claims 10^12 float32 values in a file of a few bytes."""
    header = b'{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4000000000000]}}'
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _mutation_case(kind: str, how: str, frac: float, trust: bool = False) -> Case:
    """A valid file of `kind`, cut at `frac` of its length or with one bit flipped there."""

    def build(d: Path, v: dict[str, Path]) -> list[str]:
        data = v[kind].read_bytes()
        pos = min(max(int(len(data) * frac), 1), len(data) - 1)
        if how == "cut":
            out = data[:pos]
        else:
            b = bytearray(data)
            b[pos] ^= 1 << (pos % 8)
            out = bytes(b)
        path = d / f"mutated-{kind}"
        path.write_bytes(out)
        return command_for(kind, path, v, trust=trust)

    suffix = "+trust" if trust else ""
    return Case(f"{how}@{frac:g}/{kind}{suffix}", build, (0, 1, 3))


CUTS = (0.0, 0.1, 0.5, 0.9, 1.0)
"""Truncation points, as fractions of the length (0 -> one byte left, 1 -> one byte short)."""
FLIPS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
"""Bit-flip positions, as fractions of the length."""
KINDS = ("module.pt", "state_dict.pt", "model.safetensors", "tensor.pt", "input.npy", "input.npz")


def _fs_cases() -> list[Case]:
    def loop(role: str) -> Callable[..., list[str]]:
        def build(d: Path, v: dict[str, Path]) -> list[str]:
            os.symlink(d / "b.pt", d / "a.pt")
            os.symlink(d / "a.pt", d / "b.pt")
            return _roles(d / "a.pt", v)[role]

        return build

    def dangling(d: Path, v: dict[str, Path]) -> list[str]:
        os.symlink(d / "gone.npy", d / "link.npy")
        return _roles(d / "link.npy", v)["input"]

    def fifo(d: Path, v: dict[str, Path]) -> list[str]:
        os.mkfifo(d / "pipe.npy")
        return _roles(d / "pipe.npy", v)["input"]

    def directory(d: Path, v: dict[str, Path]) -> list[str]:
        (d / "folder.pt").mkdir()
        return _roles(d / "folder.pt", v)["model"]

    def device(d: Path, v: dict[str, Path]) -> list[str]:
        return _roles(Path("/dev/zero"), v)["input"]

    return [
        Case("fs/symlink-loop/model", loop("model"), (3,), "symbolic links"),
        Case("fs/symlink-loop/input", loop("input"), (3,), "symbolic links"),
        Case("fs/symlink-loop/layers", loop("layers"), (3,), "symbolic links"),
        Case("fs/dangling-symlink", dangling, (3,), "does not exist"),
        Case("fs/fifo", fifo, (3,), "not a regular file"),
        Case("fs/directory", directory, (3,), "directory"),
        Case("fs/dev-zero", device, (3,), "not a regular file"),
        Case("fs/empty", _write("empty.pt", lambda: b"", "model"), (3,), "empty"),
    ]


def hostile_cases() -> list[Case]:
    """Every hostile file the suite feeds to the real CLI (test_hostile.py runs each one)."""
    cases = [
        _payload_case(kind, role)
        for kind in PAYLOAD_NAMES
        for role in ("model", "model+arch", "input", "layers")
    ]
    big = (10**6, 10**6)
    cases += [
        Case("header/npy-1e12", _write("big.npy", lambda: forged_npy(big)), needle="header claims"),
        Case(
            "header/npy-v2-1e12",
            _write("big2.npy", lambda: npy_header(big, version=(2, 0)) + b"\0" * 64),
            needle="header claims",
        ),
        Case(
            "header/npy-1e30",
            _write("huge.npy", lambda: forged_npy((10**15, 10**15))),
            needle="header claims",
        ),
        Case("header/npy-negative", _write("neg.npy", lambda: forged_npy((-1, 3))), needle="shape"),
        Case(
            "header/npz-stored-1e12",
            _write("big.npz", lambda: npz_of({"x.npy": forged_npy(big)})),
            needle="header claims",
        ),
        Case(
            "header/npz-deflated-1e12",
            _write("bigd.npz", lambda: npz_of({"x.npy": forged_npy(big)}, zipfile.ZIP_DEFLATED)),
            needle="header claims",
        ),
        Case(
            "header/npz-second-member-1e12",
            _write(
                "big2.npz",
                lambda: npz_of({"a.npy": npy_of(input_array()), "b.npy": forged_npy(big)}),
            ),
            needle="header claims",
        ),
        Case(
            "header/safetensors-1e12",
            _write("big.safetensors", _safetensors_forged, "model+arch"),
            needle="safetensors",
        ),
        Case("object/npy", _write("obj.npy", _object_npy), needle="Python objects"),
        Case(
            "object/npz",
            _write("obj.npz", lambda: npz_of({"x.npy": _object_npy()})),
            needle="Python objects",
        ),
        Case(
            "object/npz-structured",
            _write("objs.npz", _structured_object_npz),
            needle="Python objects",
        ),
        Case("zip-bomb/npz", _zip_bomb_case("bomb.npz", "x.npy"), needle="zip bomb"),
        Case("zip-bomb/pt", _zip_bomb_case("bomb.pt", "archive/data/0"), needle="zip bomb"),
        Case(
            "zip-forged-size/npz",
            _forged_size("forged.npz", "x.npy", lambda: npz_of({"x.npy": npy_of(input_array())})),
            needle="claims",
        ),
        Case(
            "zip-forged-size/pt",
            _forged_size("forged.pt", "archive/data/0", _tensor_zip),
            needle="claims",
        ),
    ]
    cases += _fs_cases()
    for kind in KINDS:
        cases += [_mutation_case(kind, "cut", f) for f in CUTS]
        cases += [_mutation_case(kind, "flip", f) for f in FLIPS]
    cases += [_mutation_case("module.pt", "cut", f, trust=True) for f in CUTS]
    cases += [_mutation_case("module.pt", "flip", f, trust=True) for f in FLIPS]
    return cases


def npy_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# --- the model as found ---------------------------------------------------------------------------
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module) -> dict[str, object]:
    """Everything bn-diff promises to leave as it found it, bit for bit: state_dict values
    (dtype, shape, bytes, and the tensor objects themselves), requires_grad, every `training`
    flag, every hook dict (keys and hook objects), the module attribute names, global hooks."""
    from torch.nn.modules import module as module_mod

    sd = model.state_dict(keep_vars=True)
    return {
        "state": {k: (str(v.dtype), tuple(v.shape), _bits(v), id(v)) for k, v in sd.items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: {a: list(getattr(m, a, {}).items()) for a in HOOK_DICTS}
            for n, m in model.named_modules()
        },
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "global": [
            len(getattr(module_mod, g, {}))
            for g in (
                "_global_forward_hooks",
                "_global_forward_pre_hooks",
                "_global_backward_hooks",
            )
        ],
    }


def file_digests(*dirs: Path) -> dict[str, str]:
    """sha256 of every file under `dirs` (names included: a stray temp file shows up too)."""
    import hashlib

    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- a model that disagrees, for exit code 1 ---------------------------------------------------
class OffByOneMilliBN(nn.BatchNorm2d):
    """A BatchNorm2d whose output is shifted by 1e-3: bn-diff must report a mismatch (exit 1)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + 1e-3


def mismatching_net() -> nn.Module:
    """The forum model (same state_dict keys), its BatchNorm2d layers made to disagree."""
    net = forum_model()
    for m in net.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = OffByOneMilliBN
    return net


TESTS_DIR = Path(__file__).resolve().parent
MISMATCH_ARCH = ["--arch", "hardening_support:mismatching_net", "--pythonpath", str(TESTS_DIR)]
