"""The compiled kernels called without dynamo (bn_diff/kernels_direct.py) against the same kernels
by torch.compile, in one process, side by side.

    PYTHONPATH=. python bench/direct_vs_dynamo.py                   # ResNet-50-style, train, batch 8
    PYTHONPATH=. python bench/direct_vs_dynamo.py --mode eval --model mobilenet --rounds 15

Builds both sets of kernels (one warm-up run each, which compiles), then times --rounds rounds of
a plain `no_grad` forward, `bn_diff.run` with torch.compile's kernels and `bn_diff.run` with the
direct ones, in turn. Prints the median overhead over the plain forward of the same round, and
the time spent inside `kernels.call` per run (kernel work plus the call's machinery; the work is
the same on both sides). One process and alternating rounds: this machine's slow and fast spells
fall on both, which separate processes timed minutes apart do not guarantee.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import torch  # noqa: E402

import bn_diff  # noqa: E402
from bn_diff import fused, kernels, kernels_direct  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=("resnet50", "mobilenet"), default="resnet50")
    ap.add_argument("--mode", choices=("train", "eval"), default="train")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not kernels_direct.available():
        sys.exit("this torch has no torch._inductor.standalone_compile: nothing to compare")
    torch.set_num_threads(args.threads)
    build = models.resnet50_style if args.model == "resnet50" else models.mobilenet_style
    net = models.calibrate(build(), (8, 3, 64, 64), batches=2)
    net = net.train() if args.mode == "train" else net.eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    real_available = kernels_direct.available
    sets: dict[str, dict[tuple[str, str], Any]] = {}
    for name, direct in (("torch.compile", False), ("direct", True)):
        kernels._compiled.clear()
        kernels_direct.available = (lambda d: lambda: d)(direct)  # type: ignore[assignment]
        for _ in range(2):
            bn_diff.run(net, x, kernel="compiled")
        sets[name] = dict(kernels._compiled)
    kernels_direct.available = real_available  # type: ignore[assignment]

    in_call = [0.0]
    real_call = kernels.call

    def timed_call(*a: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_call(*a)
        finally:
            in_call[0] += time.perf_counter() - t

    fused.kernels.call = timed_call  # type: ignore[assignment]

    def plain() -> None:
        with torch.no_grad():
            net(x)

    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in sets}}
    calls: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(args.rounds):
        for k in times:
            if k != "plain":
                kernels._compiled.clear()
                kernels._compiled.update(sets[k])
                in_call[0] = 0.0
            t = time.perf_counter()
            if k == "plain":
                plain()
            else:
                bn_diff.run(net, x, kernel="compiled")
            times[k].append(time.perf_counter() - t)
            if k != "plain":
                calls[k].append(in_call[0])
    failure = kernels.status()["failure"]
    if failure is not None:
        sys.exit(f"a kernel failed, the comparison is void: {failure}")
    base = statistics.median(times["plain"])
    print(
        f"{args.model}, {args.mode}, batch {args.batch}, {args.threads} threads, "
        f"median of {args.rounds} rounds; plain forward {base * 1e3:.1f} ms"
    )
    print("| kernels | overhead over plain (ms) | ratio | kernels.call per run (ms) |")
    print("|---|---|---|---|")
    for k in sets:
        over = statistics.median(c - p for c, p in zip(times[k], times["plain"], strict=True))
        ratio = statistics.median(times[k]) / base
        print(
            f"| {k} | {over * 1e3:.1f} | {ratio:.3f}x | {statistics.median(calls[k]) * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
