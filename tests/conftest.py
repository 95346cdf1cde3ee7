"""Shared fixtures: the example files of `make demo`."""

from __future__ import annotations

import os
from pathlib import Path

import helpers  # noqa: F401  (puts examples/ on sys.path)
import pytest
from hypothesis import settings

# CI must not flake: the same examples every run. HYPOTHESIS_PROFILE=explore searches afresh.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def example_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files `make demo` uses, made once per session."""
    import make_examples

    out = tmp_path_factory.mktemp("examples")
    make_examples.main(out)
    return out
