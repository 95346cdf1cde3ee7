"""torch.export backend: interpret an ExportedProgram node by node and record every batch-norm op.

Safety: `torch.export.load` is not a safe loader (torch 2.13): it unpickles pickled weights and
constants with `weights_only=False` / `pickle.loads`, parses shape expressions with
`sympy.sympify` (which evaluates Python), and loads AOTInductor shared libraries when the archive
has them. A .pt2 file can therefore run code, and bn-diff opens one only with --trust. An
in-memory ExportedProgram (the Python API) needs no such consent.

Names come from `node.meta["nn_module_stack"]` (the innermost module's qualified name); the mode
from the op: `_native_batch_norm_legit_no_training` / `_batch_norm_no_update` normalize with the
running statistics, `_native_batch_norm_legit_functional` / `_batch_norm_with_update` with the
batch's, and `batch_norm` / `native_batch_norm` / `_native_batch_norm_legit` say so in `training`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx

from bn_diff.capture import strip_wrappers
from bn_diff.errors import InputError, ModelError, UsageError
from bn_diff.load import Inputs

from .base import ROOT, ExportedBn, ExportedRun, KeepBuffers

TRAINING_BY_OP: dict[str, bool | None] = {
    "batch_norm": None,  # None: read the `training` argument
    "native_batch_norm": None,
    "_native_batch_norm_legit": None,
    "_native_batch_norm_legit_functional": None,
    "_native_batch_norm_legit_no_training": False,
    "_batch_norm_with_update": True,
    "_batch_norm_with_update_functional": True,
    "_batch_norm_no_update": False,
    "cudnn_batch_norm": None,
    "miopen_batch_norm": None,
}

TRUST_HINT = "pass --trust if you made this file (or trust who did)"


def op_name(target: Any) -> str | None:
    """The op's name ("_native_batch_norm_legit_no_training") if it is a batch norm, else None."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    ns, _, name = str(schema.name).partition("::")
    if ns != "aten" or name not in TRAINING_BY_OP:
        return None
    return name


def module_name(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return strip_wrappers(str(path)) or ROOT


def _bind(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = [a.name for a in target._schema.arguments]
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    # cudnn/miopen spell momentum and eps differently
    if "exponential_average_factor" in bound:
        bound["momentum"] = bound["exponential_average_factor"]
    if "epsilon" in bound:
        bound["eps"] = bound["epsilon"]
    return bound


def _t(v: Any) -> torch.Tensor | None:
    return v.detach().clone() if isinstance(v, torch.Tensor) else None


class _BnRecorder(torch.fx.Interpreter):
    """Runs the graph and records each batch-norm node's inputs, arguments and output."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.layers: list[ExportedBn] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        name = op_name(n.target) if n.op == "call_function" else None
        if name is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        bound = _bind(n.target, args, kwargs)
        rm, rv = _t(bound.get("running_mean")), _t(bound.get("running_var"))
        result = super().run_node(n)
        y = result[0] if isinstance(result, (tuple, list)) else result
        fixed = TRAINING_BY_OP[name]
        training = bool(bound.get("training", False)) if fixed is None else fixed
        if rm is None or rv is None:
            training = True
        mom = bound.get("momentum")
        self.layers.append(
            ExportedBn(
                node=n.name,
                op=f"aten.{name}",
                name=module_name(n),
                kind="bn",
                x=_t(bound.get("input")),
                y=y.detach().clone(),  # a later relu_ must not change it
                weight=_t(bound.get("weight")),
                bias=_t(bound.get("bias")),
                running_mean=rm,
                running_var=rv,
                eps=float(bound.get("eps", 1e-5)),
                momentum=None if mom is None else float(mom),
                training=training,
            )
        )
        return result


def run_program(ep: Any, inputs: Inputs, label: str) -> ExportedRun:
    """Interpret an ExportedProgram once on `inputs`."""
    if inputs.kwargs:
        raise UsageError(
            "a torch.export program is fed positional inputs only", "save a tensor or a tuple"
        )
    try:
        gm = ep.module()
    except Exception as e:
        raise InputError(
            f"{label}: cannot build a module from the exported program ({e})", None
        ) from None
    rec = _BnRecorder(gm)
    try:
        with torch.no_grad(), KeepBuffers(gm):
            out = rec.run(*inputs.args, enable_io_processing=True)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs.args)
        raise ModelError(
            f"the exported program failed on input {shapes}: {first[:200]}", None
        ) from None
    leaves = torch.utils._pytree.tree_leaves(out)
    return ExportedRun(
        path=label,
        format="torch.export",
        exporter="torch.export",
        layers=rec.layers,
        outputs=[t for t in leaves if isinstance(t, torch.Tensor)],
    )


def load(path: Path, trust: bool) -> Any:
    if not trust:
        raise InputError(
            f"{path} is a torch.export archive; torch.export.load can run code from it (pickled "
            "weights, sympy-parsed shapes, AOTInductor libraries), so bn-diff refuses it",
            TRUST_HINT,
        )
    try:
        return torch.export.load(str(path))
    except FileNotFoundError:
        raise InputError(f"exported model {path} does not exist", "check the path") from None
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile, OSError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{path} is not a readable torch.export archive ({first[:160]})", None
        ) from None


def run_file(path: Path, inputs: Inputs, trust: bool) -> ExportedRun:
    return run_program(load(path, trust), inputs, str(path))
