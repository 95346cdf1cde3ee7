"""Docs that run: every `$ bn-diff ...` block in README.md and its shown output are the real thing."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import ROOT, cli

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
    import make_examples

    make_examples.main(ROOT / "examples" / "out")


@pytest.mark.parametrize("command, expected", _console_blocks(), ids=lambda v: v[:60])
def test_readme_console_block(demo_files: None, command: str, expected: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "bn-diff"
    r = cli(*argv[1:], cwd=ROOT, columns=100)
    got = (r.out + r.err).rstrip()
    assert [ln.rstrip() for ln in got.splitlines()] == [ln.rstrip() for ln in expected.splitlines()]


def test_readme_mentions_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_exit_code_table_matches_enum() -> None:
    from bn_diff.errors import ExitCode

    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \|", README, flags=re.M), code
