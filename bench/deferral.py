"""What moving per-layer work out of the BN hooks, to after the forward, would save (issue 7).

    PYTHONPATH=. python bench/deferral.py                 # ResNet-50-style, train, batch 8
    PYTHONPATH=. python bench/deferral.py --mode eval --rounds 15

Part 1 checks every layer after the forward instead of in its hook, on a small input, and counts
the layers whose verdict changes: whatever reads a layer's x or y must stay in the hook, because
the model may rewrite them in place afterwards (the ResNet's `ReLU(inplace=True)` rewrites y).

Part 2 times, in one process and in turn (median of --rounds after two warm-ups), a plain forward,
the check with the health findings in each hook (as `bn_diff.run` does), and the same check with
the health findings computed after the forward from what the hooks kept (the call without its
tensors, and the layer's result). It prints each one's overhead over the plain forward, and the
time spent in the health findings themselves both ways. The findings must come out the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import models  # noqa: E402
import torch  # noqa: E402
from floor import alternate  # noqa: E402
from torch import nn  # noqa: E402

from bn_diff import kernels, pipeline  # noqa: E402
from bn_diff.capture import BnCall, Capture  # noqa: E402
from bn_diff.health import HealthCheck  # noqa: E402
from bn_diff.layer_check import check_call  # noqa: E402
from bn_diff.results import LayerResult  # noqa: E402

TOL = pipeline.make_tolerance(None, None)


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """t's shape, dtype and device with no storage behind it (a broadcast zero)."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def after_the_forward(net: nn.Module, x: torch.Tensor) -> None:
    kept: list[BnCall] = []
    with torch.no_grad(), Capture(net, kept.append):
        net(x)
        with torch._C.DisableTorchFunction():
            late = [check_call(c, TOL) for c in kept]
    in_hooks = pipeline.run(net, x, health=False).layers
    changed = sum(1 for a, b in zip(late, in_hooks, strict=True) if a.mismatched != b.mismatched)
    print(f"checked after the forward: {changed} of {len(late)} layers change their verdict")


def timings(net: nn.Module, x: torch.Tensor, rounds: int) -> None:
    spent: dict[str, list[float]] = {"in the hooks": [], "after the forward": []}
    found: dict[str, list[LayerResult]] = {}

    def plain() -> None:
        with torch.no_grad():
            net(x)

    def in_hooks() -> None:
        health, out, t_health = HealthCheck(net, "as-is"), [], 0.0

        def on_bn(call: BnCall) -> None:
            nonlocal t_health
            with torch._C.DisableTorchFunction():
                res = check_call(call, TOL)
                t = time.perf_counter()
                out.append(health(call, res))
                t_health += time.perf_counter() - t

        with torch.no_grad(), Capture(net, on_bn), pipeline.paused_gc():
            net(x)
        spent["in the hooks"].append(t_health)
        found["in the hooks"] = out

    def deferred() -> None:
        health, kept = HealthCheck(net, "as-is"), []

        def on_bn(call: BnCall) -> None:
            with torch._C.DisableTorchFunction():
                res = check_call(call, TOL)
                light = dataclasses.replace(call, x=_stand_in(call.x), y=_stand_in(call.y))
                kept.append((light, res))

        with torch.no_grad(), Capture(net, on_bn), pipeline.paused_gc():
            net(x)
            t = time.perf_counter()
            with torch._C.DisableTorchFunction():
                out = [health(c, r) for c, r in kept]
            spent["after the forward"].append(time.perf_counter() - t)
        found["after the forward"] = out

    cases: dict[str, Callable[[], None]] = {
        "plain forward": plain,
        "health in the hooks": in_hooks,
        "health after the forward": deferred,
    }
    for _ in range(2):
        for f in cases.values():
            f()
    for v in spent.values():
        v.clear()
    times = alternate(cases, rounds)
    base = statistics.median(times["plain forward"])
    print(f"| {'median of ' + str(rounds):28s} | ms | over plain (ms) |")
    print("|---|---|---|")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k:28s} | {med * 1e3:.1f} | {(med - base) * 1e3:+.1f} |")
    for k, v in spent.items():
        print(f"health findings {k}: {statistics.median(v) * 1e3:.1f} ms a run")
    a, b = found["in the hooks"], found["after the forward"]
    same = all(p.findings == q.findings for p, q in zip(a, b, strict=True))
    print(f"same findings both ways: {same} ({sum(len(p.findings) for p in a)} findings)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("eval", "train"), default="train")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_policy("compiled")
    net = models.calibrate(models.resnet50_style(), (8, 3, 64, 64), batches=2)
    net.train(args.mode == "train")
    after_the_forward(net, torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"ResNet-50-style, {args.mode}, batch {args.batch}, {args.threads} threads")
    timings(net, x, args.rounds)


if __name__ == "__main__":
    main()
