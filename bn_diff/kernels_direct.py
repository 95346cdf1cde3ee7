"""The check kernels compiled by inductor from a symbolic trace, and called without dynamo.

A `torch.compile`d function pays dynamo's machinery on every call: the frame hook, its guards,
the AOT runtime wrappers. Warm, that is ~50 µs a call; inside a BN hook, right after the model's
convolutions have evicted the caches, ~300 µs (bench/RESULTS.md, session 5), which on ResNet-50
in train mode (65 kernel calls a forward) is ~20 ms a run against ~40 ms of kernel work.

`Direct` compiles the same Python source the other way: `make_fx` traces it with symbolic sizes
(no duck sizing: equal example sizes do not become one symbol), `torch._inductor.standalone_compile`
turns the graph into the same generated code, and the shape environment's guards (every size,
stride and storage offset relation the code assumes, sizes 0 and 1 specialised) become one
compiled Python expression. A call checks its arguments' dtypes, devices and dimensions and that
expression (a few µs), then runs the generated code: ~20 µs a call warm. Arguments no variant
accepts are traced and compiled as a new variant, up to `VARIANTS`; past that the call raises,
like dynamo at its recompile limit, and the caller's eager pass takes the layer.

Inductor caches the compiled graph on disk by the graph's content, as it does under dynamo: a
second process loads it instead of compiling again.
"""

from __future__ import annotations

import gc
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

VARIANTS = 64
"""At most this many compiled variants per kernel (dtypes, devices, sizes of 1, layouts), as
kernels.py allows dynamo's recompiles."""

Signature = tuple[tuple[torch.dtype, torch.device, int], ...]
Guard = Callable[[dict[str, torch.Tensor]], bool]
"""The shape environment's guards as a function of {"t0": first argument, ...}."""


def available() -> bool:
    """Whether this torch's inductor compiles a standalone graph in a given fake mode (the
    `standalone_compile` of recent releases; older ones lack it or its `fake_mode`)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import torch._inductor

            params = inspect.signature(torch._inductor.standalone_compile).parameters
            _AVAILABLE = "fake_mode" in params and "dynamic_shapes" in params
        except (ImportError, AttributeError, TypeError, ValueError):
            _AVAILABLE = False
    return _AVAILABLE


_AVAILABLE: bool | None = None


class Direct:
    """One kernel source, compiled per variant of its arguments, called without dynamo."""

    def __init__(self, source: Callable[..., Any], options: dict[str, Any]) -> None:
        self.source = source
        self.options = options
        self._variants: list[tuple[Signature, Guard, Callable[..., Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, *args: torch.Tensor) -> Any:
        sig = signature(args)
        for key, guard, fn in self._variants:  # append-only: safe to read while another appends
            if key == sig and _holds(guard, args):
                return fn(*args)
        return self._compile(sig, args)(*args)

    @property
    def variants(self) -> int:
        return len(self._variants)

    def _compile(self, sig: Signature, args: Sequence[torch.Tensor]) -> Callable[..., Any]:
        with self._lock:
            for key, guard, fn in self._variants:  # another thread may have compiled it
                if key == sig and _holds(guard, args):
                    return fn
            if len(self._variants) >= VARIANTS:
                raise RuntimeError(
                    f"recompile limit: more than {VARIANTS} shape or dtype variants of one kernel"
                )
            fn, guard = _build(self.source, args, self.options)
            # the trace and the compile leave cyclic garbage (graph nodes, fake tensors, their
            # shape environment) that a run's paused collector would keep through the forward
            gc.collect()
            if not _holds(guard, args):  # cannot happen: the trace's own arguments
                raise RuntimeError(
                    "a compiled kernel's guards reject the arguments it was traced on"
                )
            self._variants.append((sig, guard, fn))
            return fn


def signature(args: Sequence[torch.Tensor]) -> Signature:
    """What the guards do not check: each argument's dtype, device and number of dimensions."""
    return tuple((a.dtype, a.device, a.dim()) for a in args)


def _holds(guard: Guard, args: Sequence[torch.Tensor]) -> bool:
    """The guards on `args`; False where they cannot even be evaluated on them."""
    try:
        return bool(guard({f"t{i}": a for i, a in enumerate(args)}))
    except (IndexError, TypeError, AttributeError):
        return False


def _build(
    source: Callable[..., Any], args: Sequence[torch.Tensor], options: dict[str, Any]
) -> tuple[Callable[..., Any], Guard]:
    """Trace `source` on `args` with symbolic sizes, compile it, and compile its guards."""
    import torch._inductor
    import torch.fx.experimental._config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    def plain(*a: torch.Tensor) -> Any:
        # no annotations: a traced function's return annotation becomes a global of the graph's
        # code, a string that inductor's cache key cannot pickle (and then never caches)
        return source(*a)

    with torch.no_grad(), fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
        gm = make_fx(plain, tracing_mode="symbolic")(*args)
    fakes = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = fakes[0].fake_mode if fakes and hasattr(fakes[0], "fake_mode") else None
    env = None if mode is None else mode.shape_env
    if mode is None or env is None:  # a symbolic trace always has both
        raise RuntimeError("a traced kernel has no shape environment to guard its sizes")
    # compiled in the trace's own fake mode, on its symbolic inputs: anything else makes new
    # symbols (duck-sized) in a new shape environment, whose assumptions the guards below
    # would not see
    art = torch._inductor.standalone_compile(
        gm,
        fakes,
        dynamic_shapes="from_example_inputs",
        fake_mode=mode,
        options={"config_patches": options},
    )
    # after the compile: inductor may add guards of its own to the trace's shape environment
    text = env.produce_guards_expression(fakes, ignore_static=False) or "True"
    # ShapeEnv.evaluate_guards_expression's evaluation, compiled once into a function
    guard: Guard = eval(
        compile(f"lambda L: {text}", "<bn-diff kernel guards>", "eval"), dict(SYMPY_INTERP)
    )
    return art, guard


__all__ = ["VARIANTS", "Direct", "available", "signature"]
