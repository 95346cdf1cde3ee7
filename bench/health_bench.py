"""What the health findings cost inside `bn_diff.run`, per run and per layer.

    python bench/health_bench.py                  # ResNet-50-style, batch 8, eval, 5 runs
    python bench/health_bench.py --mode train --batch 8 --runs 5 --profile

Builds the model as bench_run.py does (calibrated), then in one process alternates `bn_diff.run`
with health on and off (`health=False`) after a warm-up, timing each run and, inside the health
runs, the `HealthCheck` extension alone (perf_counter around each call). Prints medians: run time
with and without health, health time per run and per layer. `--profile` adds a cProfile of one
health run (top functions by cumulative time under HealthCheck.__call__).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50_style")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", default="eval", choices=("eval", "train", "as-is"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--cold", action="store_true", help="--repeat with caches evicted each time")
    p.add_argument("--verbose", action="store_true", help="each call's health time")
    p.add_argument("--repeat", type=int, default=0, help="time each call this often more, alone")
    p.add_argument("--code", help="import bn_diff from this directory (e.g. an older checkout)")
    a = p.parse_args()
    if a.code:
        sys.path.insert(0, a.code)

    import models
    import torch

    import bn_diff
    from bn_diff import health

    net = getattr(models, a.model)()
    models.calibrate(net, (2, 3, 224, 224), batches=2)
    net.eval()
    x = torch.randn(a.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    spent: list[float] = []
    calls = [0]
    original = health.HealthCheck.__call__

    best: list[float] = []
    flush = torch.zeros(8 << 20) if a.cold else None  # 32 MiB
    prof = cProfile.Profile() if a.profile else None

    def timed_call(self: Any, call: Any, result: Any) -> Any:
        t = time.perf_counter()
        out = original(self, call, result)
        spent.append(time.perf_counter() - t)
        calls[0] += 1
        if a.repeat:  # the same call again on fresh extensions: the least time, less noise
            times = []
            for _ in range(a.repeat):
                if flush is not None:
                    flush.add_(1.0)  # evict the caches, as the model's own work does in a run
                fresh = health.HealthCheck(self.model, self.run_mode)
                fresh._modules = self._modules
                t = time.perf_counter()
                original(fresh, call, result)
                times.append(time.perf_counter() - t)
            best.append(min(times))
        if prof is not None:
            fresh = health.HealthCheck(self.model, self.run_mode)
            fresh._modules = self._modules
            prof.enable()
            original(fresh, call, result)
            prof.disable()
        return out

    health.HealthCheck.__call__ = timed_call  # type: ignore[method-assign]

    def once(with_health: bool) -> float:
        t = time.perf_counter()
        bn_diff.run(net, x, mode=a.mode, health=with_health)
        return time.perf_counter() - t

    profiling, prof = prof, None
    once(True)
    once(False)
    on: list[float] = []
    off: list[float] = []
    per_run: list[float] = []
    layers = 0
    for i in range(a.runs):
        if i == a.runs - 1:
            prof = profiling
        spent.clear()
        best.clear()
        calls[0] = 0
        on.append(once(True))
        per_run.append(sum(spent))
        layers = calls[0]
        off.append(once(False))
    h = statistics.median(per_run)
    if a.verbose:
        print("last run, per call (ms):", " ".join(f"{t * 1e3:.2f}" for t in spent))
    print(f"model {a.model}, batch {a.batch}, mode {a.mode}, {layers} BN calls, {a.runs} runs")
    print(f"run with health    median {statistics.median(on) * 1e3:8.1f} ms  {on}")
    print(f"run without health median {statistics.median(off) * 1e3:8.1f} ms")
    print(f"health per run     median {h * 1e3:8.2f} ms  ({h / max(layers, 1) * 1e3:.3f} ms/layer)")
    if best:
        b = sum(best)
        print(
            f"health alone, least of {a.repeat} per call: {b * 1e3:.2f} ms per run "
            f"({b / len(best) * 1e3:.3f} ms/layer)"
        )
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
