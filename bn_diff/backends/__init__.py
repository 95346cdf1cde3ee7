"""Backends that load and run an exported model once: ONNX (onnxruntime), torch.export, TorchScript.

Each is imported only when needed; ONNX needs the `bn-diff[onnx]` extra and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bn_diff.errors import InputError, UsageError
from bn_diff.load import Inputs

from .base import ExportedBn, ExportedConv, ExportedRun

__all__ = ["ExportedBn", "ExportedConv", "ExportedRun", "run_exported"]


def run_exported(
    exported: Any, inputs: Inputs, *, trust: bool = False, label: str = ""
) -> ExportedRun:
    """Load (if a path) and run an exported model once.

    `exported` is a path (.onnx, .pt2, or a TorchScript archive), an onnx ModelProto, an object with
    `.model_proto` (torch.onnx.ONNXProgram), a torch.export.ExportedProgram or a ScriptModule.
    """
    if isinstance(exported, (str, Path)):
        return _run_path(Path(exported), inputs, trust)
    kind = type(exported).__name__
    if kind == "ModelProto" or hasattr(exported, "model_proto"):
        from . import onnx as onnx_backend

        proto = getattr(exported, "model_proto", exported)
        return onnx_backend.run(proto, inputs, label or "ONNX model")
    if kind == "ExportedProgram":
        from . import torch_export

        return torch_export.run_program(exported, inputs, label or "ExportedProgram")
    if kind in ("RecursiveScriptModule", "ScriptModule", "TopLevelTracedModule"):
        from . import torchscript

        return torchscript.run_module(exported, inputs, label or "ScriptModule")
    raise UsageError(
        f"cannot check a {kind}: pass a path, an ONNX model, an ExportedProgram or a ScriptModule",
        None,
    )


def _run_path(path: Path, inputs: Inputs, trust: bool) -> ExportedRun:
    if not path.exists():
        raise InputError(f"exported model {path} does not exist", "check the path")
    if path.is_dir():
        raise InputError(
            f"exported model {path} is a directory, not a file", "pass the file inside it"
        )
    if path.stat().st_size == 0:
        raise InputError(f"exported model {path} is empty", "re-export it")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from . import onnx as onnx_backend

        return onnx_backend.run_file(path, inputs)
    if suffix == ".pt2":
        from . import torch_export

        return torch_export.run_file(path, inputs, trust)
    from . import torchscript

    if torchscript.is_torchscript(path):
        return torchscript.run_file(path, inputs, trust)
    raise UsageError(
        f"{path} is not an exported model bn-diff knows (.onnx, torch.export .pt2, TorchScript)",
        "to check a PyTorch model itself use `bn-diff run`",
    )
