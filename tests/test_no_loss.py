"""Nothing lost: every command and exit path leaves the user's files and model as they were.

- CLI (`run`, `layers`), every exit code 0-4: the checkpoint, the input and a report.json that
  existed before are byte-identical afterwards (the report only changes on success, and then
  completely), and no stray file (a temp file) is left in the folder.
- `--json PATH` is written atomically: a failure during the write (disk full at fsync, the rename
  failing, an interrupt) leaves the old report whole and no temp file behind.
- API: `bn_diff.run` on every exit path (ok, mismatch, usage error, model error, bn-diff's own
  bug inside a hook, an interrupt) leaves state_dict, flags and hooks bit-identical.
- Determinism: two runs on the same files give identical JSON, in one process and across two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hardening_support import (
    ARCH,
    MISMATCH_ARCH,
    ROOT,
    Payload,
    assert_clean_outcome,
    file_digests,
    fingerprint,
    forum_model,
    run_cli,
    write_valid,
)
from torch import nn

import bn_diff
import bn_diff.pipeline as pipeline
from bn_diff.errors import BnDiffError, ModelError, UsageError
from bn_diff.render import jsonout

OLD_REPORT = '{"old": "report"}\n'


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    v = write_valid(tmp_path / "data")
    (tmp_path / "data" / "report.json").write_text(OLD_REPORT)
    torch.save(Payload(f"touch {tmp_path / 'MARKER'}"), tmp_path / "data" / "payload.pt")
    torch.save(torch.randn(2, 5, 6, 6), tmp_path / "data" / "wrong_channels.pt")
    return v


def _boom(*_a: object, **_k: object) -> None:
    raise RuntimeError("a bug in bn-diff")


# (id, argv builder, exit code, report.json rewritten?)
PATHS = [
    ("run/ok", lambda v, r: ["run", str(v["state_dict.pt"]), str(v["tensor.pt"]), *ARCH], 0, False),
    (
        "run/ok/json",
        lambda v, r: ["run", str(v["state_dict.pt"]), str(v["input.npz"]), *ARCH, "--json", r],
        0,
        True,
    ),
    (
        "run/ok/json-stdout",
        lambda v, r: [
            "run",
            str(v["model.safetensors"]),
            str(v["input.npy"]),
            *ARCH,
            "--json",
            "-",
        ],
        0,
        False,
    ),
    (
        "run/ok/trusted-module",
        lambda v, r: ["run", str(v["module.pt"]), str(v["tensor.pt"]), "--trust", "--json", r],
        0,
        True,
    ),
    (
        "run/ok/mode-eval",
        lambda v, r: [
            "run",
            str(v["module.pt"]),
            str(v["tensor.pt"]),
            "--trust",
            "--mode",
            "eval",
            "--json",
            r,
        ],
        0,
        True,
    ),
    (
        "run/mismatch",
        lambda v, r: [
            "run",
            str(v["state_dict.pt"]),
            str(v["tensor.pt"]),
            *MISMATCH_ARCH,
            "--json",
            r,
        ],
        1,
        True,
    ),
    (
        "run/usage/layer",
        lambda v, r: [
            "run",
            str(v["state_dict.pt"]),
            str(v["tensor.pt"]),
            *ARCH,
            "--layer",
            "nope",
            "--json",
            r,
        ],
        2,
        False,
    ),
    (
        "run/usage/atol-alone",
        lambda v, r: [
            "run",
            str(v["state_dict.pt"]),
            str(v["tensor.pt"]),
            *ARCH,
            "--atol",
            "1",
            "--json",
            r,
        ],
        2,
        False,
    ),
    (
        "run/usage/state-dict-no-arch",
        lambda v, r: ["run", str(v["state_dict.pt"]), str(v["tensor.pt"]), "--json", r],
        2,
        False,
    ),
    (
        "run/usage/json-folder-missing",
        lambda v, r: [
            "run",
            str(v["state_dict.pt"]),
            str(v["tensor.pt"]),
            *ARCH,
            "--json",
            r + ".d/x.json",
        ],
        2,
        False,
    ),
    (
        "run/bad-input/payload",
        lambda v, r: ["run", str(Path(r).parent / "payload.pt"), str(v["tensor.pt"]), "--json", r],
        3,
        False,
    ),
    (
        "run/bad-input/wrong-channels",
        lambda v, r: [
            "run",
            str(v["state_dict.pt"]),
            str(Path(r).parent / "wrong_channels.pt"),
            *ARCH,
            "--json",
            r,
        ],
        3,
        False,
    ),
    (
        "run/bad-input/truncated",
        lambda v, r: [
            "run",
            str(v["state_dict.pt"]),
            str(Path(r).parent / "cut.npy"),
            *ARCH,
            "--json",
            r,
        ],
        3,
        False,
    ),
    (
        "run/internal",
        lambda v, r: ["run", str(v["state_dict.pt"]), str(v["tensor.pt"]), *ARCH, "--json", r],
        4,
        False,
    ),
    (
        "layers/ok/json",
        lambda v, r: ["layers", str(v["module.pt"]), "--trust", "--json", r],
        0,
        True,
    ),
    ("layers/ok/arch", lambda v, r: ["layers", str(v["model.safetensors"]), *ARCH], 0, False),
    (
        "layers/usage/state-dict-no-arch",
        lambda v, r: ["layers", str(v["state_dict.pt"]), "--json", r],
        2,
        False,
    ),
    (
        "layers/bad-input/payload",
        lambda v, r: ["layers", str(Path(r).parent / "payload.pt"), "--json", r],
        3,
        False,
    ),
]


@pytest.mark.parametrize("path_id, argv, code, rewrites", PATHS, ids=[p[0] for p in PATHS])
def test_cli_exit_path_loses_nothing(
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    path_id: str,
    argv,  # type: ignore[no-untyped-def]
    code: int,
    rewrites: bool,
) -> None:
    data = files["tensor.pt"].parent
    (data / "cut.npy").write_bytes(files["input.npy"].read_bytes()[:100])
    report = data / "report.json"
    if path_id == "run/internal":
        monkeypatch.setattr(pipeline, "check_call", _boom)
    before = file_digests(data)
    o = run_cli(*argv(files, str(report)))
    assert o.code == code, o.err
    if code != 4:
        assert_clean_outcome(o, (code,))
    after = file_digests(data)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    if rewrites:
        assert changed == {str(report)}
        text = report.read_text()
        assert json.loads(text)["schema"].startswith("bn-diff/")
    else:
        assert changed == set(), changed
        assert report.read_text() == OLD_REPORT
    assert not (data.parent / "MARKER").exists()


@pytest.mark.parametrize("stage", ["fsync", "replace", "write"])
def test_json_write_failure_keeps_old_report_and_leaves_no_temp(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Disk full at fsync, a failing rename, a failing write: one line, exit 2, old file whole."""
    data = files["tensor.pt"].parent
    report = data / "report.json"
    before = file_digests(data)

    def enospc(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    if stage == "fsync":
        monkeypatch.setattr(jsonout.os, "fsync", enospc)
    elif stage == "replace":
        monkeypatch.setattr(jsonout.os, "replace", enospc)
    else:
        real_fdopen = jsonout.os.fdopen

        class HalfWriter:
            def __init__(self, f):  # type: ignore[no-untyped-def]
                self.f = f

            def __enter__(self):  # type: ignore[no-untyped-def]
                return self

            def __exit__(self, *a):  # type: ignore[no-untyped-def]
                self.f.close()

            def write(self, text: str) -> None:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                enospc()

        monkeypatch.setattr(
            jsonout.os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k))
        )
    o = run_cli(
        "run", str(files["state_dict.pt"]), str(files["tensor.pt"]), *ARCH, "--json", str(report)
    )
    assert_clean_outcome(o, (2,))
    assert "cannot write" in o.err and "No space left" in o.err
    assert file_digests(data) == before
    assert report.read_text() == OLD_REPORT


def test_interrupt_during_write_keeps_old_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    target.write_text(OLD_REPORT)

    def interrupt(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(jsonout.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        jsonout.write_atomic(target, '{"new": 1}\n')
    assert target.read_text() == OLD_REPORT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# --- the API path -------------------------------------------------------------------------------
def _model() -> nn.Module:
    m = forum_model()
    m[0].register_forward_hook(lambda mod, a, o: None)
    m.register_forward_pre_hook(lambda mod, a: None)
    return m


class Interrupts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn(x)
        raise KeyboardInterrupt


def _x(c: int = 3) -> torch.Tensor:
    return torch.randn(4, c, 6, 6, generator=torch.Generator().manual_seed(3))


API_PATHS = {
    "ok": (_model, lambda m: bn_diff.run(m, _x()), None),
    "ok/mode-eval": (_model, lambda m: bn_diff.run(m, _x(), mode="eval"), None),
    "ok/mode-train-on-eval-model": (
        lambda: _model().eval(),
        lambda m: bn_diff.run(m, _x(), mode="train"),
        None,
    ),
    "mismatch": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 2, 3), __import__("hardening_support").OffByOneMilliBN(2)
        ),
        lambda m: bn_diff.run(m, _x()),
        None,
    ),
    "usage/layer": (_model, lambda m: bn_diff.run(m, _x(), layers=["nope"]), UsageError),
    "usage/tolerance": (_model, lambda m: bn_diff.run(m, _x(), atol=-1.0, rtol=0.0), UsageError),
    "model-error/channels": (_model, lambda m: bn_diff.run(m, _x(5)), ModelError),
    "internal/extension-raises": (
        _model,
        lambda m: bn_diff.run(m, _x(), extensions=[lambda call, res: _boom()]),  # type: ignore[func-returns-value]
        RuntimeError,
    ),
    "interrupt/keyboard": (
        Interrupts,
        lambda m: bn_diff.run(m, _x(), mode="train"),
        KeyboardInterrupt,
    ),
}


@pytest.mark.parametrize("name", list(API_PATHS))
def test_api_exit_path_leaves_model_as_found(name: str) -> None:
    build, call, exc = API_PATHS[name]
    model = build()
    before = fingerprint(model)
    if exc is None:
        report = call(model)
        assert bool(report) == (name != "mismatch")
    else:
        with pytest.raises(exc):
            call(model)
    assert fingerprint(model) == before
    if exc is RuntimeError:
        assert not issubclass(exc, BnDiffError)


def test_capture_restores_what_the_train_mode_forward_changed() -> None:
    """Not vacuous: the same forward without bn-diff does change the buffers."""
    model = _model().eval()
    before = fingerprint(model)
    bn_diff.run(model, _x(), mode="train")
    assert fingerprint(model) == before
    model.train()
    with torch.no_grad():
        model(_x())
    model.eval()
    assert fingerprint(model)["state"] != before["state"]


# --- determinism --------------------------------------------------------------------------------
def test_two_runs_same_json_in_process(files: dict[str, Path], tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        o = run_cli(
            "run",
            str(files["state_dict.pt"]),
            str(files["input.npz"]),
            *ARCH,
            "--json",
            str(tmp_path / f"r{i}.json"),
        )
        assert o.code == 0, o.err
        outs.append((tmp_path / f"r{i}.json").read_bytes())
    assert outs[0] == outs[1]


def test_two_processes_same_json(files: dict[str, Path], tmp_path: Path) -> None:
    outs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=seed, NO_COLOR="1")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "bn_diff",
                "run",
                str(files["module.pt"]),
                str(files["tensor.pt"]),
                "--trust",
                "--json",
                "-",
            ],
            capture_output=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["layers"]


def test_copy_of_files_gives_same_report(files: dict[str, Path], tmp_path: Path) -> None:
    """Same bytes, other path: only the path strings differ."""
    other = tmp_path / "copy"
    shutil.copytree(files["tensor.pt"].parent, other)
    a = run_cli("run", str(files["state_dict.pt"]), str(files["input.npy"]), *ARCH, "--json", "-")
    b = run_cli("run", str(other / "state_dict.pt"), str(other / "input.npy"), *ARCH, "--json", "-")
    ja, jb = json.loads(a.out), json.loads(b.out)
    for j in (ja, jb):
        j.pop("model")
        j.pop("input")
    assert ja == jb
