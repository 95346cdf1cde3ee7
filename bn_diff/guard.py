"""What `Capture` needs, beyond buffers and flags, to leave an odd model exactly as it found it.

- `ParamGuard`: a forward that writes a parameter in place (weight clipping, re-normalisation)
  would leave the model changed. Copying every parameter up front costs as much as the model, so
  the guard notes version counters only, and copies a parameter just before an in-place call
  touches it (the capture's TorchFunctionMode sees such calls). `restore` puts the copies back and
  names any parameter whose version changed without a copy (e.g. `torch.ops.aten.add_`, which
  bypasses the mode). A write through a numpy view changes no version: that one goes unseen.
- `is_compiled`: `torch.compile`d modules, which must run eagerly while hooks are in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_compiled(m: nn.Module) -> bool:
    """A `torch.compile`d module (torch._dynamo's OptimizedModule wraps `_orig_mod`)."""
    return isinstance(getattr(m, "_orig_mod", None), nn.Module) and "Optimized" in type(m).__name__


def writes_in_place(func: Any, kwargs: dict[str, Any]) -> bool:
    """`t.add_(...)`, `t[i] = v`, `t += v`, `torch.add(..., out=t)`: a call that writes into its
    first argument (or into `out`)."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):
        return True
    return name == "__setitem__" or name.startswith("__i") or "out" in kwargs


class ParamGuard:
    """Copy-before-write for the parameters of one model, for the length of one capture."""

    def __init__(self, model: nn.Module) -> None:
        self._versions: list[tuple[str, torch.Tensor, int]] = []
        self._by_storage: dict[int, torch.Tensor] = {}
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, p in model.named_parameters(remove_duplicate=True):
            if isinstance(p, nn.parameter.UninitializedParameter):
                continue
            self._versions.append((name, p, p._version))
            if p.numel():
                self._by_storage[p.untyped_storage().data_ptr()] = p

    def __bool__(self) -> bool:
        return bool(self._by_storage)

    def before(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Called before every torch function of the forward: copy a parameter it will write."""
        if not writes_in_place(func, kwargs):
            return
        # which argument is written differs (`t.add_(x)`, `init.normal_(tensor=t)`, `out=t`):
        # copy every parameter the call touches, once per capture
        for target in (*args, *kwargs.values()):
            for t in target if isinstance(target, (list, tuple)) else (target,):
                if not isinstance(t, torch.Tensor) or t.numel() == 0:
                    continue
                p = self._by_storage.get(t.untyped_storage().data_ptr())
                if p is not None and id(p) not in self._saved:
                    with torch.no_grad():
                        self._saved[id(p)] = (p, p.detach().clone())

    def restore(self) -> list[str]:
        """Put written parameters back; return the names of any changed without a copy."""
        lost = [n for n, p, v in self._versions if p._version != v and id(p) not in self._saved]
        with torch.no_grad():
            for p, saved in self._saved.values():
                p.copy_(saved)
        self._saved.clear()
        self._by_storage.clear()
        self._versions.clear()
        return lost
