"""pytest example: fail the test suite when an export stops matching the eager model.

    python -m pytest -q examples/ci/test_bn_export.py

`bn_diff.check(exported, inputs, against=model)` compares every BatchNorm of the export (a BN
node, or a conv the exporter folded it into) with the eager layer; `assert_ok()` raises an
AssertionError that names each failing layer with its mismatch statistics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402

import bn_diff  # noqa: E402


@pytest.fixture(scope="module")
def model_and_input() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = models.calibrate(models.resnet_tiny(), (8, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, x


def test_onnx_export_matches_eager(model_and_input: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = model_and_input
    program = torch.onnx.export(model, (x,), dynamo=True)  # BN folded into the convs
    bn_diff.check(program, x, against=model).assert_ok()


def test_torch_export_matches_eager(model_and_input: tuple[torch.nn.Module, torch.Tensor]) -> None:
    model, x = model_and_input
    program = torch.export.export(model, (x,))
    bn_diff.check(program, x, against=model).assert_ok()
