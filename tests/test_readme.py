"""Docs that run: every `$ bn-diff ...` block in README.md and its shown output are the real thing."""

from __future__ import annotations

import os
import re
import shlex

import pytest
from helpers import ROOT, cli

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _console_blocks() -> list[tuple[str, str]]:
    """(command, expected output) for each ```console block of README.md."""
    blocks = []
    for body in re.findall(r"```console\n(.*?)```", README, flags=re.S):
        lines = body.splitlines()
        assert lines[0].startswith("$ "), body
        blocks.append((lines[0][2:], "\n".join(lines[1:]).rstrip()))
    return blocks


@pytest.fixture(scope="module")
def demo_files() -> None:
    """What `make demo` writes: the examples, and the ONNX export of examples/ci."""
    import make_examples

    make_examples.main(ROOT / "examples" / "out")
    if any(cmd.startswith("bn-diff check ") for cmd, _ in _console_blocks()):
        import runpy

        ci = ROOT / "examples" / "out" / "ci"
        if not (ci / "model.onnx").exists():
            mod = runpy.run_path(str(ROOT / "examples" / "ci" / "export_model.py"))
            mod["main"](ci)


def _real_output(command: str) -> str:
    argv = shlex.split(command)
    assert argv[0] == "bn-diff"
    # the README's outputs were made with 2 torch threads (the CI machine): a convolution summed
    # by another number of threads rounds differently, and `check` prints eager-vs-export gaps
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = cli(*argv[1:], cwd=ROOT, columns=100)
    finally:
        torch.set_num_threads(threads)
    return "\n".join(ln.rstrip() for ln in (r.out + r.err).rstrip().splitlines())


@pytest.mark.parametrize("command, expected", _console_blocks(), ids=lambda v: v[:60])
def test_readme_console_block(demo_files: None, command: str, expected: str) -> None:
    got = _real_output(command)
    if os.environ.get("BN_DIFF_UPDATE_SNAPSHOTS"):
        path = ROOT / "README.md"
        text = path.read_text(encoding="utf-8")
        old = (
            f"```console\n$ {command}\n{expected}\n```"
            if expected
            else f"```console\n$ {command}\n```"
        )
        assert old in text
        path.write_text(text.replace(old, f"```console\n$ {command}\n{got}\n```"), encoding="utf-8")
        return
    assert got.splitlines() == [ln.rstrip() for ln in expected.splitlines()]


def test_readme_mentions_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_exit_code_table_matches_enum() -> None:
    from bn_diff.errors import ExitCode

    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \|", README, flags=re.M), code
