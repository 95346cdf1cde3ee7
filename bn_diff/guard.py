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


class BufferSnapshot:
    """The values of a model's buffers (running statistics, num_batches_tracked) at one moment,
    and `restore` to put them back into the same tensor objects.

    Buffers of one device and dtype are saved as one concatenated copy and compared back in one
    call: a ResNet-50 has 159 buffers, and a clone and a `torch.equal` (a synchronisation on a
    GPU) per buffer cost ~4 ms on a CPU and ~11 ms on an H100 per run. A buffer is written back
    only where its value differs (NaN counts as different), as before: an unchanged buffer keeps
    its version counter."""

    def __init__(self, model: nn.Module) -> None:
        self._entries: list[tuple[nn.Module, str, torch.Tensor, torch.Size]] = []
        self._groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        self._alone: dict[int, torch.Tensor] = {}
        self._flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        with torch.no_grad():
            for m in model.modules():
                for bname, buf in m._buffers.items():
                    if buf is None:
                        continue
                    k = len(self._entries)
                    self._entries.append((m, bname, buf, buf.shape))
                    if buf.layout == torch.strided and not buf.is_quantized:
                        self._groups.setdefault((buf.device, buf.dtype), []).append(k)
                    else:  # sparse or quantized: a copy of its own
                        self._alone[k] = buf.detach().clone()
            for key, ks in self._groups.items():
                self._flat[key] = self._cat(ks)

    def _cat(self, ks: list[int]) -> torch.Tensor:
        return torch.cat([self._entries[k][2].detach().reshape(-1) for k in ks])

    def restore(self) -> None:
        """Every buffer back in its module, as the same tensor object, with its saved value."""
        with torch.no_grad():
            for m, bname, orig, _ in self._entries:
                m._buffers[bname] = orig
            for key, ks in self._groups.items():
                saved = self._flat[key]
                same_form = all(
                    self._entries[k][2].dtype == key[1] and self._entries[k][2].device == key[0]
                    for k in ks
                )
                if same_form and torch.equal(self._cat(ks), saved):
                    continue
                start = 0
                for k in ks:  # some differ (train mode, an in-place write): buffer by buffer
                    orig, shape = self._entries[k][2], self._entries[k][3]
                    n = shape.numel()
                    value = saved[start : start + n].view(shape)
                    start += n
                    if orig.dtype != key[1] or not torch.equal(orig, value):
                        orig.copy_(value)
            for k, value in self._alone.items():
                orig = self._entries[k][2]
                if _differs(orig, value):
                    orig.copy_(value)
        self._entries.clear()
        self._groups.clear()
        self._flat.clear()
        self._alone.clear()


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a buffer's value changed; True where `torch.equal` has no kernel (sparse)."""
    try:
        return a.dtype != b.dtype or not torch.equal(a, b)
    except (RuntimeError, NotImplementedError):
        return True
