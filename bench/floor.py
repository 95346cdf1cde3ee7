"""Where the floor of a checked forward is: what the capture alone and the compiled kernel alone
cost, and what the kernel costs per element in each layout.

    PYTHONPATH=. python bench/floor.py              # ResNet-50-style, batch 8, 2 threads
    PYTHONPATH=. python bench/floor.py --batch 32 --rounds 5

Part 1 times, in one process and in turn (median of --rounds): the plain forward; the forward
under `Capture` with a no-op check; the same with only the compiled kernel run on each BN layer
(partial results thrown away); `bn_diff.run(kernel="compiled")`, with and without the health
findings. Part 2 times the compiled kernels on ResNet-50's BN shapes at this batch: per-(sample,
channel) rows, per-channel fold, the full kernel without the division (relative difference), and
a kernel that only reads x and y.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import torch  # noqa: E402

import bn_diff  # noqa: E402
from bn_diff import fused, kernels  # noqa: E402
from bn_diff.capture import BnCall, Capture  # noqa: E402

F64 = torch.float64


def alternate(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds each case took in each of `rounds` rounds, the cases run in turn within a round
    (so that the machine's slow and fast spells fall on all of them)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def part1(batch: int, rounds: int) -> None:
    net = models.calibrate(models.resnet50_style(), (8, 3, 64, 64), batches=2).eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def kernel_only(call: BnCall) -> None:
        xv, yv = fused.view3(call.x), fused.view3(call.y)
        assert xv is not None and yv is not None
        p = torch.zeros(int(xv.shape[1]), 1, dtype=F64)
        with torch._C.DisableTorchFunction():
            kernels.call(kernels.layout(int(xv.shape[2])), "full", xv, yv, p, p, p)

    def captured(check: Callable[[BnCall], None]) -> None:
        with torch.no_grad(), Capture(net, check, mode="as-is"):
            net(x)

    def plain() -> None:
        with torch.no_grad():
            net(x)

    cases: dict[str, Callable[[], object]] = {
        "plain forward": plain,
        "capture, no-op check": lambda: captured(lambda call: None),
        "capture + compiled kernel only": lambda: captured(kernel_only),
        "bn_diff.run(kernel='compiled')": lambda: bn_diff.run(net, x, kernel="compiled"),
        "same, health=False": lambda: bn_diff.run(net, x, kernel="compiled", health=False),
    }
    for f in cases.values():  # warm-up (compiles)
        f()
    times = alternate(cases, rounds)
    base = statistics.median(times["plain forward"])
    print(f"| ResNet-50-style, batch {batch}, eval | median (ms) | ratio |")
    print("|---|---|---|")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k} | {med * 1e3:.1f} | {med / base:.2f}x |")


def part2(batch: int) -> None:
    r = (2,)

    def no_division(x, y, p, na, nb):  # type: ignore[no-untyped-def]
        xd = x.to(F64) - p
        ne = na * xd + nb
        rr = y.to(F64) + ne
        return xd.sum(r), (xd * xd).sum(r), rr.amax(r), rr.amin(r), x.amax(r), x.amin(r)

    def read_only(x, y, p, na, nb):  # type: ignore[no-untyped-def]
        return x.amax(r), y.amax(r)

    variants = {
        "rows": kernels._kernel(("rows", "full")),
        "fold": kernels._kernel(("fold", "full")),
        "rows, no division": torch.compile(no_division, dynamic=True, options=kernels._options()),
        "rows, read x and y only": torch.compile(read_only, dynamic=True),
    }
    shapes = [(256, 3136), (512, 784), (1024, 196), (2048, 49)]
    print()
    print("| kernel (ns per element) | " + " | ".join(f"{c}x{n}" for c, n in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for name, fn in variants.items():
        cells = []
        for c, length in shapes:
            xs = torch.randn(batch, c, length)
            ys = torch.randn(batch, c, length)
            p = torch.zeros(c, 1, dtype=F64)
            a = torch.rand(c, 1, dtype=F64)
            fn(xs, ys, p, a, p)
            t = time.perf_counter()
            for _ in range(10):
                fn(xs, ys, p, a, p)
            cells.append(f"{(time.perf_counter() - t) / 10 / xs.numel() * 1e9:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    part1(args.batch, args.rounds)
    part2(args.batch)


if __name__ == "__main__":
    main()
