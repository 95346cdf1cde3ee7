"""Run-level guards for odd models and odd command lines, used by `pipeline.run`/`run_files`.

- `empty_batch` / `empty_update`: a zero-size batch has nothing to compare; PyTorch leaves the
  running statistics alone (and still counts the batch), which is what the check expects.
- `refuse_unsupported`: TorchScript runs no Python hooks; an uninitialized Lazy module would be
  changed by its first forward. Both are refused before anything runs.
- `capture_findings`: what the capture noticed (compiled modules run eagerly; a parameter the
  forward changed behind the guard).
- `check_device`: `--device` names cpu or an available cuda device.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import BnCall, Capture
from .errors import ModelError, UsageError
from .results import Finding, RunningUpdate


def empty_batch(call: BnCall) -> tuple[Finding, ...]:
    return (
        Finding(
            "empty_batch",
            "info",
            f"{call.name} got an empty batch (input shape {tuple(call.x.shape)}): no values to "
            "compare",
            layer=call.name,
        ),
    )


def empty_update(call: BnCall) -> RunningUpdate | None:
    """PyTorch leaves running statistics alone on an empty batch (it still counts the batch)."""
    rm0, rv0 = call.running_mean_before, call.running_var_before
    rm1, rv1 = call.running_mean_after, call.running_var_after
    if rm0 is None or rv0 is None or rm1 is None or rv1 is None:
        return None
    dm = (rm1.double() - rm0.double()).abs()
    dv = (rv1.double() - rv0.double()).abs()
    n0, n1 = call.num_batches_tracked_before, call.num_batches_tracked_after
    nbt_ok = n0 is None or n1 is None or n1 == n0 + 1
    k = call.momentum if call.momentum is not None else 1.0 / max(n1 or 1, 1)
    largest_m = float(dm.max().item()) if dm.numel() else 0.0
    largest_v = float(dv.max().item()) if dv.numel() else 0.0
    return RunningUpdate(
        momentum_used=k,
        max_abs_diff_mean=largest_m,
        max_abs_diff_var=largest_v,
        num_batches_tracked_ok=nbt_ok,
        ok=largest_m == 0.0 and largest_v == 0.0 and nbt_ok,
        largest_mean_change=largest_m,
        largest_var_change=largest_v,
    )


def refuse_unsupported(model: nn.Module) -> None:
    """TorchScript runs no Python hooks; a Lazy module's first forward would create parameters."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            "the model is a TorchScript module; bn-diff hooks eager modules, and TorchScript "
            "does not run Python hooks",
            "pass the eager model it was scripted from",
        )
    lazy = [
        n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)
    ]
    lazy += [n for n, b in model.named_buffers() if isinstance(b, nn.parameter.UninitializedBuffer)]
    if lazy:
        raise ModelError(
            f"the model has uninitialized lazy parameters ({', '.join(lazy[:3])}); checking it "
            "would create them and change the model",
            "run one forward on a real batch first (or load its weights), then bn-diff",
        )


def capture_findings(cap: Capture) -> list[Finding]:
    out: list[Finding] = []
    if cap.compiled:
        out.append(
            Finding(
                "compiled_module",
                "info",
                f"{', '.join(cap.compiled)} is torch.compile'd: bn-diff ran it eagerly (the "
                "original module) to hook its layers; compiled kernels may round differently",
            )
        )
    if cap.unrestored:
        out.append(
            Finding(
                "model_changed",
                "warning",
                f"the model's forward changed {', '.join(cap.unrestored[:3])} in place in a way "
                "bn-diff could not undo",
                "keep the forward free of in-place writes to parameters",
            )
        )
    return out


def check_device(device: str) -> None:
    """--device: cpu, or an available cuda device (a bad name is a usage error, not a bug)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device name", "use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda asked for, but CUDA is not available here", "use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA devices", None
            )
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: bn-diff runs on cpu or cuda", "use cpu or cuda")
