"""bn-diff: make PyTorch BatchNorm transparent.

Public API (mirrors the CLI):
    report = bn_diff.run(model, inputs, mode="as-is", atol=None, rtol=None)
    bool(report)        # every BN layer agrees with its float64 recompute
    report.to_json()    # schema "bn-diff/run/v1"
    bn_diff.explain(model, inputs, layer="bn")          # one element's arithmetic
    bn_diff.check(exported, inputs, against=model)      # an exported model vs eager

Submodules are named so that none shadows these functions (explain_arith, check_export).
    report = bn_diff.check("model.onnx", inputs, against=model)   # exported model vs eager
    report.assert_ok()  # for pytest: AssertionError naming every failing layer

Attributes are imported lazily so that `bn-diff --help` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "run": "pipeline",
    "run_files": "pipeline",
    "explain": "pipeline_explain",
    "explain_files": "pipeline_explain",
    "Explanation": "explain_results",
    "check": "check_export",
    "check_files": "check_export",
    "CheckReport": "check_report",
    "BnDiffError": "errors",
    "ExitCode": "errors",
    "InputError": "errors",
    "ModelError": "errors",
    "UsageError": "errors",
    "ChannelStats": "results",
    "ChannelTable": "channel_table",
    "Finding": "results",
    "Hypothesis": "results",
    "LayerInfo": "results",
    "LayerResult": "results",
    "RunningUpdate": "results",
    "RunReport": "results",
    "Tolerance": "results",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'bn_diff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
