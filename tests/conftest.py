"""Shared fixtures: the example files of `make demo`."""

from __future__ import annotations

from pathlib import Path

import helpers  # noqa: F401  (puts examples/ on sys.path)
import pytest


@pytest.fixture(scope="session")
def example_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files `make demo` uses, made once per session."""
    import make_examples

    out = tmp_path_factory.mktemp("examples")
    make_examples.main(out)
    return out
