"""Hook every conv and normalization layer for one forward, then leave the model as found.

`Capture` is a context manager. Inside it, every BatchNorm call (module, duck-typed frozen BN, or a
bare `F.batch_norm` call) is handed to `on_bn` as a `BnCall` while its input and output are alive;
nothing is kept afterwards. On exit, in `finally`, the hooks are removed and every buffer (running
statistics, num_batches_tracked) and every `training` flag is restored; a parameter the forward
writes in place is copied first and restored too (`guard.ParamGuard`).

Odd but legal models: a BN module called twice is reported per call (`name`, `name#2`); the user's
own hooks stay in place and run (bn-diff's output hook runs first, so it sees the module's raw
output); `torch.compile`d modules run eagerly while captured (`set_stance("force_eager")`), since
compiled graphs cannot call Python hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from .recompute import Moments

from .guard import BufferSnapshot, ParamGuard, is_compiled

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def is_batchnorm(m: nn.Module) -> bool:
    """A real BatchNorm (BatchNorm1d/2d/3d, SyncBatchNorm, Lazy variants, subclasses)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(
        m, nn.modules.instancenorm._InstanceNorm
    )


def is_frozen_bn(m: nn.Module) -> bool:
    """Duck-typed frozen BN (torchvision/detectron2 FrozenBatchNorm2d): always running stats."""
    if is_batchnorm(m) or isinstance(m, NORM_TYPES):
        return False
    attrs = ("weight", "bias", "running_mean", "running_var")
    return all(isinstance(getattr(m, a, None), torch.Tensor) for a in attrs) and not any(
        True for _ in m.children()
    )


def is_bn_like(m: nn.Module) -> bool:
    return is_batchnorm(m) or is_frozen_bn(m)


def strip_wrappers(name: str) -> str:
    """Qualified names without `torch.compile`'s `_orig_mod.` and DataParallel's `module.`."""
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    return ".".join(parts)


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` with wrapper prefixes removed."""
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    for name, m in model.named_modules():
        n = strip_wrappers(name)
        if wrapped and (n == "module" or n.startswith("module.")):
            n = n[len("module.") :] if n != "module" else ""
        yield n, m


@dataclass(slots=True)
class BnCall:
    """One BatchNorm call, handed to the checker while its tensors are alive."""

    name: str
    type: str
    x: torch.Tensor
    y: torch.Tensor
    training: bool
    """The `training` flag the call ran with."""
    use_batch_stats: bool
    """Whether the output was normalized with batch statistics (else running buffers)."""
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean_before: torch.Tensor | None
    running_var_before: torch.Tensor | None
    num_batches_tracked_before: int | None
    running_mean_after: torch.Tensor | None
    running_var_after: torch.Tensor | None
    num_batches_tracked_after: int | None
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    updates_running_stats: bool
    """Whether this call should have written the running buffers (train mode, tracking)."""
    producer: str | None
    module: nn.Module | None
    sample0: Moments | None = None
    """Not captured: sample 0's own moments, where the check's pass had them for free
    (layer_check sets it; health_batch reads it instead of walking x[:1] once more)."""


OnBn = Callable[[BnCall], None]


def _clone(t: Any) -> torch.Tensor | None:
    return t.detach().clone() if isinstance(t, torch.Tensor) else None


def _nbt(m: nn.Module) -> int | None:
    t = getattr(m, "num_batches_tracked", None)
    return int(t.item()) if isinstance(t, torch.Tensor) and t.numel() == 1 else None


class _FunctionalBN(TorchFunctionMode):
    """Catches `F.batch_norm` calls that do not come from a hooked BN module."""

    def __init__(self, owner: Capture) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm and self.owner._in_bn == 0 and self.owner.functional:
            return self.owner._functional(func, args, kwargs)
        if self.owner._guard:
            self.owner._guard.before(func, args, kwargs)
        return func(*args, **kwargs)


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: dict[str, Any] = {
    "weight": None,
    "bias": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
}


class Capture:
    """Context manager: hooks conv and BN layers, restores the model afterwards."""

    def __init__(
        self,
        model: nn.Module,
        on_bn: OnBn,
        mode: str = "as-is",
        functional: bool = True,
    ) -> None:
        if mode not in ("as-is", "train", "eval"):
            raise ValueError(f"mode must be as-is, train or eval, not {mode!r}")
        self.model = model
        self.on_bn = on_bn
        self.mode = mode
        self.functional = functional
        self.calls: dict[str, int] = {}
        self._in_bn = 0
        self._stack: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._conv_out: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
        self._pending: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None, int | None]]]
        self._pending = {}
        self._buffers: BufferSnapshot | None = None
        self._flags: list[tuple[nn.Module, bool]] = []
        self._mode_ctx: _FunctionalBN | None = None
        self._guard: ParamGuard | None = None
        self._stance: Any = None
        self.unrestored: list[str] = []
        """Parameters the forward changed in a way bn-diff could not undo (should stay empty)."""
        self.compiled: list[str] = []
        """`torch.compile`d modules, which ran eagerly while captured."""

    # --- context management -------------------------------------------------------------------
    def __enter__(self) -> Capture:
        try:
            self._snapshot()
            if self.mode == "train":
                self.model.train()
            elif self.mode == "eval":
                self.model.eval()
            self._install()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _snapshot(self) -> None:
        self._flags = [(m, m.training) for m in self.model.modules()]
        self._buffers = BufferSnapshot(self.model)
        self._guard = ParamGuard(self.model)
        self.compiled = [n or "(model)" for n, m in named_modules(self.model) if is_compiled(m)]

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._mode_ctx is not None:
            self._mode_ctx.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self._mode_ctx = None
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None
        if self._guard is not None:
            self.unrestored = self._guard.restore()
            self._guard = None
        if self._buffers is not None:
            self._buffers.restore()
            self._buffers = None
        for m, flag in self._flags:
            m.training = flag
        self._flags.clear()
        self._conv_out.clear()

    # --- hooks ---------------------------------------------------------------------------------
    def _install(self) -> None:
        for name, m in named_modules(self.model):
            label = name or "(model)"
            self._handles.append(m.register_forward_pre_hook(self._push(label)))
            self._handles.append(m.register_forward_hook(self._pop(), always_call=True))
            if isinstance(m, CONV_TYPES):
                self._handles.append(m.register_forward_hook(self._conv_hook(label)))
            elif is_bn_like(m):
                self._handles.append(m.register_forward_pre_hook(self._bn_pre(m)))
                self._handles.append(  # prepend: the module's own output, before a user hook's
                    m.register_forward_hook(
                        self._bn_post(label, m), prepend=True, with_kwargs=True, always_call=True
                    )
                )
        if self.compiled:  # compiled graphs cannot call Python hooks: run them eagerly
            self._stance = torch.compiler.set_stance("force_eager")
            self._stance.__enter__()
        if self._guard and not self.functional:  # the parameter guard needs the mode too
            self._mode_ctx = _FunctionalBN(self)
            self._mode_ctx.__enter__()  # type: ignore[no-untyped-call]
        if self.functional:
            self._mode_ctx = _FunctionalBN(self)
            self._mode_ctx.__enter__()  # type: ignore[no-untyped-call]

    def _push(self, label: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any) -> None:
            self._stack.append(label)

        return hook

    def _pop(self) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, _out: Any) -> None:
            if self._stack:
                self._stack.pop()

        return hook

    def _conv_hook(self, label: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self._conv_out[id(out)] = (label, weakref.ref(out))

        return hook

    def _producer(self, x: torch.Tensor) -> str | None:
        hit = self._conv_out.get(id(x))
        if hit is not None and hit[1]() is x:
            return hit[0]
        return None

    def _bn_pre(self, m: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any) -> None:
            self._in_bn += 1
            self._pending.setdefault(id(m), []).append(
                (
                    _clone(getattr(m, "running_mean", None)),
                    _clone(getattr(m, "running_var", None)),
                    _nbt(m),
                )
            )

        return hook

    def _bn_post(self, label: str, m: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
            pending = self._pending.get(id(m))
            if not pending:  # a user pre-hook raised before ours ran: nothing to pair with
                return
            self._in_bn -= 1
            before = pending.pop()
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                return
            call = self._module_call(label, m, x, out, before)
            # The checker's own torch ops must not go through the TorchFunctionMode that watches
            # the model for F.batch_norm: a Python round trip per op would cost more than the check.
            with torch._C.DisableTorchFunction():
                self.on_bn(call)

        return hook

    def _unique(self, name: str) -> str:
        k = self.calls.get(name, 0) + 1
        self.calls[name] = k
        return name if k == 1 else f"{name}#{k}"

    def _module_call(
        self,
        label: str,
        m: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        before: tuple[torch.Tensor | None, torch.Tensor | None, int | None],
    ) -> BnCall:
        rm_after = getattr(m, "running_mean", None)
        rv_after = getattr(m, "running_var", None)
        if is_batchnorm(m):
            track = bool(getattr(m, "track_running_stats", True))
            has_buffers = rm_after is not None and rv_after is not None
            use_batch = m.training or not has_buffers
            updates = m.training and track and has_buffers
            momentum = getattr(m, "momentum", None)
            eps = float(getattr(m, "eps", 1e-5))
            affine = bool(getattr(m, "affine", True))
        else:  # frozen BN: always the running statistics
            track, use_batch, updates = True, False, False
            momentum = None
            eps = float(getattr(m, "eps", 0.0))
            affine = True
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        return BnCall(
            name=self._unique(label),
            type=type(m).__name__,
            x=x,
            y=y,
            training=m.training,
            use_batch_stats=use_batch,
            weight=w if isinstance(w, torch.Tensor) else None,
            bias=b if isinstance(b, torch.Tensor) else None,
            running_mean_before=before[0],
            running_var_before=before[1],
            num_batches_tracked_before=before[2],
            running_mean_after=rm_after if isinstance(rm_after, torch.Tensor) else None,
            running_var_after=rv_after if isinstance(rv_after, torch.Tensor) else None,
            num_batches_tracked_after=_nbt(m),
            eps=eps,
            momentum=None if momentum is None else float(momentum),
            affine=affine,
            track_running_stats=track,
            updates_running_stats=updates,
            producer=self._producer(x),
            module=m,
        )

    def _functional(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = dict(_BN_DEFAULTS)
        bound.update(zip(_BN_ARGS, args, strict=False))
        bound.update(kwargs)
        rm, rv = bound["running_mean"], bound["running_var"]
        rm0, rv0 = _clone(rm), _clone(rv)
        out = func(*args, **kwargs)
        x = bound["input"]
        if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
            return out
        training = bool(bound["training"])
        has = isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)
        caller = self._stack[-1] if self._stack else "(model)"
        momentum = bound["momentum"]
        w, b = bound["weight"], bound["bias"]
        self.on_bn(
            BnCall(
                name=self._unique(caller + ":F.batch_norm"),
                type="F.batch_norm",
                x=x,
                y=out,
                training=training,
                use_batch_stats=training or not has,
                weight=w,
                bias=b,
                running_mean_before=rm0,
                running_var_before=rv0,
                num_batches_tracked_before=None,
                running_mean_after=rm if has else None,
                running_var_after=rv if has else None,
                num_batches_tracked_after=None,
                eps=float(bound["eps"]),
                momentum=None if momentum is None else float(momentum),
                affine=w is not None or b is not None,
                track_running_stats=has,
                updates_running_stats=training and has,
                producer=self._producer(x),
                module=None,
            )
        )
        return out
