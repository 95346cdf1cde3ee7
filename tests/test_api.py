"""The public Python API: bn_diff.run / explain / check are functions, whatever was imported."""

from __future__ import annotations

import importlib
import types

import models
import torch

import bn_diff


def test_api_names_are_functions_even_after_every_submodule_is_imported() -> None:
    for mod in (
        "explain_arith",
        "explain_results",
        "pipeline_explain",
        "check_export",
        "check_report",
        "diagnose",
        "pipeline",
        "health",
    ):
        importlib.import_module(f"bn_diff.{mod}")
    for name in ("run", "explain", "check"):
        assert callable(getattr(bn_diff, name)), name
        assert not isinstance(getattr(bn_diff, name), types.ModuleType), name


def test_explain_api_on_the_forum_case() -> None:
    net = models.forum_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    exp = bn_diff.explain(net, x, layer="bn")
    assert isinstance(exp, bn_diff.Explanation) and bool(exp)
    assert exp.to_json()["schema"] == "bn-diff/explain/v1"
    assert net.training  # left as found


def test_public_names_resolve() -> None:
    for name in bn_diff.__all__:
        assert getattr(bn_diff, name) is not None
