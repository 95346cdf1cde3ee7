"""Fixtures of the `check` tests; the helpers live in check_helpers.py."""

from __future__ import annotations

import pytest
from check_helpers import Exports


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))
