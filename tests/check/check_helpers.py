"""Shared, session-scoped exports for the `check` tests (exports are slow: each is made once).

`exports.model(arch)` is a calibrated eval-mode model from examples/models.py;
`exports.path(arch, kind)` exports it on first use into a session temp folder:
kind = "dynamo" (default: BN folded into conv), "noopt" (dynamo, optimize=False: BN nodes kept),
"legacy" (dynamo=False: folded, names lost), "legacy_bn" (dynamo=False,
do_constant_folding=False: BN nodes named by scope), "pt2" (torch.export.save), "script".
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
import models  # noqa: E402

SHAPE = (2, 3, 32, 32)
ARCHS = {"resnet_tiny": models.resnet_tiny, "mobilenet_tiny": models.mobilenet_tiny}


def quiet(fn: Any) -> Any:
    """Run an exporter without its progress prints and warnings."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            return fn()
    finally:
        logging.disable(before)


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, kind: str) -> Path:
    if kind == "dynamo":
        quiet(lambda: torch.onnx.export(model, (x,), str(path), dynamo=True))
    elif kind == "noopt":
        quiet(lambda: torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False))
    elif kind == "legacy":
        quiet(lambda: torch.onnx.export(model, (x,), str(path), dynamo=False))
    elif kind == "legacy_bn":
        quiet(
            lambda: torch.onnx.export(
                model, (x,), str(path), dynamo=False, do_constant_folding=False
            )
        )
    elif kind == "pt2":
        torch.export.save(quiet(lambda: torch.export.export(model, (x,))), str(path))
    elif kind == "script":
        torch.jit.script(model).save(str(path))
    else:
        raise ValueError(kind)
    return path


SUFFIX = {"pt2": ".pt2", "script": ".ts"}


class Exports:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[str, torch.nn.Module] = {}
        self._paths: dict[tuple[str, str], Path] = {}
        self.x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))

    def model(self, arch: str) -> torch.nn.Module:
        if arch not in self._models:
            torch.manual_seed(0)
            self._models[arch] = models.calibrate(ARCHS[arch](), (4, 3, 32, 32))
        return self._models[arch]

    def path(self, arch: str, kind: str) -> Path:
        key = (arch, kind)
        if key not in self._paths:
            self._paths[key] = export(
                self.model(arch),
                self.x,
                self.root / f"{arch}_{kind}{SUFFIX.get(kind, '.onnx')}",
                kind,
            )
        return self._paths[key]

    def files(self, arch: str) -> tuple[Path, Path]:
        """(state_dict .pt, input .pt) of the calibrated model, for the CLI."""
        sd, inp = self.root / f"{arch}_state.pt", self.root / "input.pt"
        if not sd.exists():
            torch.save(self.model(arch).state_dict(), sd)
        if not inp.exists():
            torch.save(self.x, inp)
        return sd, inp

    def bn_names(self, arch: str) -> list[str]:
        return [
            n for n, m in self.model(arch).named_modules() if isinstance(m, torch.nn.BatchNorm2d)
        ]
