"""The result of `check`: every BN layer of an exported model checked, in schema `bn-diff/check/v1`.

Layer objects are run/v1's (`LayerResult.to_json`) plus `exported_as` (`bn`, `folded_conv`,
`missing`), `checked`, and in check/v1 `ok` means "this layer passes the gate": its numbers agree
and it has no finding at or above `fail_on`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .results import (
    SEVERITY_RANK,
    Finding,
    LayerResult,
    Severity,
    Tolerance,
    _num,
    default_pair,
)

SCHEMA_CHECK = "bn-diff/check/v1"


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """One final output of the exported model against the eager model's."""

    index: int
    shape: tuple[int, ...]
    max_abs_diff: float
    atol: float
    rtol: float
    ok: bool

    def __bool__(self) -> bool:
        return self.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "shape": list(self.shape),
            "max_abs_diff": _num(self.max_abs_diff),
            "atol": self.atol,
            "rtol": self.rtol,
            "ok": self.ok,
        }


@dataclass(frozen=True, slots=True)
class CheckReport:
    """A whole `check`: the export, what it was compared with, every layer, run-wide findings."""

    exported: str
    """Path (or description) of the exported model."""
    format: str
    """"onnx", "torch.export" or "torchscript"."""
    exporter: str
    """"dynamo", "legacy", "torch.export", "torchscript" or "" (unknown)."""
    against: str | None
    """The eager model compared with; None: the export was checked on its own."""
    input: str
    tolerance: Tolerance
    layers: tuple[LayerResult, ...]
    findings: tuple[Finding, ...] = ()
    """Run-wide findings (final outputs, skipped checks, the input)."""
    outputs: tuple[OutputCheck, ...] = ()
    fail_on: Severity = "error"
    """Findings of this severity or worse fail the check."""

    @property
    def all_findings(self) -> tuple[Finding, ...]:
        return self.findings + tuple(f for lr in self.layers for f in lr.findings)

    def _fails(self, f: Finding) -> bool:
        return SEVERITY_RANK[f.severity] >= SEVERITY_RANK[self.fail_on]

    @property
    def failing_findings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.all_findings if self._fails(f))

    def layer_ok(self, lr: LayerResult) -> bool:
        """The layer's numbers agree and none of its findings reaches `fail_on`."""
        return bool(lr) and not any(self._fails(f) for f in lr.findings)

    @property
    def failed_layers(self) -> tuple[LayerResult, ...]:
        return tuple(lr for lr in self.layers if not self.layer_ok(lr))

    def __bool__(self) -> bool:
        return (
            all(self.layer_ok(lr) for lr in self.layers)
            and all(self.outputs)
            and not any(self._fails(f) for f in self.findings)
        )

    def count(self, exported_as: str) -> int:
        return sum(1 for lr in self.layers if lr.extra.get("exported_as") == exported_as)

    def to_json(self) -> dict[str, Any]:
        """The dict of schema `bn-diff/check/v1`."""
        layers = []
        for lr in self.layers:
            d = lr.to_json()
            d["ok"] = self.layer_ok(lr)
            layers.append(d)
        return {
            "schema": SCHEMA_CHECK,
            "ok": bool(self),
            "exported": self.exported,
            "format": self.format,
            "exporter": self.exporter,
            "against": self.against,
            "input": self.input,
            "tolerance": self._tolerance_json(),
            "fail_on": self.fail_on,
            "layers": layers,
            "findings": [f.to_json() for f in self.findings],
            "outputs": [o.to_json() for o in self.outputs],
            "summary": {
                "layers": len(self.layers),
                "failed": len(self.failed_layers),
                "bn": self.count("bn"),
                "folded_conv": self.count("folded_conv"),
                "missing": self.count("missing"),
                "unchecked": sum(1 for lr in self.layers if not lr.extra.get("checked", True)),
            },
        }

    def _tolerance_json(self) -> dict[str, Any]:
        tol = self.tolerance
        if tol.explicit:
            return {"atol": tol.atol, "rtol": tol.rtol, "policy": "explicit"}
        dtypes = [lr.info.dtype for lr in self.layers]
        dominant = max(set(dtypes), key=dtypes.count) if dtypes else "float32"
        atol, rtol = default_pair(dominant)
        return {
            "atol": atol,
            "rtol": rtol,
            "policy": "dtype+rounding",
            "rounding_k": tol.rounding_k,
        }

    def assert_ok(self) -> None:
        """For pytest: raise AssertionError naming every failing layer and finding."""
        if self:
            return
        from .render.junit import failure_summary

        raise AssertionError(failure_summary(self))
