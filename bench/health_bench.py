"""What the health findings cost inside `bn_diff.run`, per run and per BN layer.

    python bench/health_bench.py                          # ResNet-50-style, batch 8, eval, 5 runs
    python bench/health_bench.py --against /tmp/base      # and an older bn_diff, same process
    python bench/health_bench.py --mode train --profile
    python bench/health_bench.py --device cuda --batch 64

Builds the model as bench_run.py does (calibrated), then in one process runs `bn_diff.run` in
rounds (a warm-up round first): without health, with this checkout's `HealthCheck`, and with the
one of `--against DIR` (DIR/bn_diff, imported as a separate package) if given. Health runs as the
pipeline runs it (first extension, inside every BN hook); a perf_counter around each call gives
its time in place, with the caches as the model's work left them. Prints the medians over the
rounds: run time, health time per run and per layer. `--repeat K` also times each call K more
times on a fresh extension right after (warm caches; `--cold` evicts them first), least of K.
`--profile` adds a cProfile of the health calls of the last round.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))


def load_base(directory: str) -> Any:
    """DIR/bn_diff as the package `bn_diff_base` (its relative imports stay inside it)."""
    pkg = Path(directory) / "bn_diff"
    spec = importlib.util.spec_from_file_location(
        "bn_diff_base", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bn_diff_base"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module("bn_diff_base.health")


class Timed:
    """A health extension for one run, timing each call in place."""

    def __init__(self, cls: Any, model: Any, mode: str, opts: argparse.Namespace) -> None:
        self.cls, self.model, self.mode, self.opts = cls, model, mode, opts
        self.ext = cls(model, mode)
        self.spent: list[float] = []
        self.alone: list[float] = []
        self.prof: cProfile.Profile | None = None
        self.flush = torch_zeros(8 << 20) if opts.cold else None  # 32 MiB

    def __call__(self, call: Any, result: Any) -> Any:
        if self.prof is not None:
            self.prof.enable()
        t = time.perf_counter()
        out = self.ext(call, result)
        self.spent.append(time.perf_counter() - t)
        if self.prof is not None:
            self.prof.disable()
        if self.opts.repeat:
            times = []
            for _ in range(self.opts.repeat):
                if self.flush is not None:
                    self.flush.add_(1.0)  # evict the caches, as the model's work does
                fresh = self.cls(self.model, self.mode)
                fresh._modules = self.ext._modules  # the producer lookup table, made once a run
                t = time.perf_counter()
                fresh(call, result)
                times.append(time.perf_counter() - t)
            self.alone.append(min(times))
        return out


def torch_zeros(n: int) -> Any:
    import torch

    return torch.zeros(n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50_style")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", default="eval", choices=("eval", "train", "as-is"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--against", help="also time DIR/bn_diff's health (e.g. an older checkout)")
    p.add_argument("--repeat", type=int, default=0, help="time each call K more times, alone")
    p.add_argument("--cold", action="store_true", help="--repeat with the caches evicted first")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    import models
    import torch

    import bn_diff
    from bn_diff import health

    torch.manual_seed(0)
    net = models.calibrate(getattr(models, a.model)(), (2, 3, 224, 224), batches=2).eval()
    net = net.to(a.device)
    x = torch.randn(a.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = x.to(a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    variants: dict[str, Any] = {"none": None, "this": health.HealthCheck}
    if a.against:
        variants["base"] = load_base(a.against).HealthCheck

    runs: dict[str, list[float]] = {k: [] for k in variants}
    per_run: dict[str, list[float]] = {k: [] for k in variants}
    alone: dict[str, list[float]] = {k: [] for k in variants}
    layers: dict[str, int] = {}
    profs: dict[str, cProfile.Profile] = {}
    for i in range(a.runs + 1):  # round 0 warms up
        for name, cls in variants.items():
            ext = None if cls is None else Timed(cls, net, a.mode, a)
            if ext is not None and a.profile and i == a.runs:
                ext.prof = profs[name] = cProfile.Profile()
            sync()
            t = time.perf_counter()
            bn_diff.run(net, x, mode=a.mode, health=False, extensions=[] if ext is None else [ext])
            sync()
            took = time.perf_counter() - t
            if i == 0:
                continue
            runs[name].append(took)
            if ext is not None:
                per_run[name].append(sum(ext.spent))
                alone[name].append(sum(ext.alone))
                layers[name] = len(ext.spent)

    n = max(layers.values())
    print(
        f"{a.model}, batch {a.batch}, mode {a.mode}, {a.device}: {n} BN calls, "
        f"median of {a.runs} rounds"
    )
    for name in variants:
        line = f"  {name:5s} run {statistics.median(runs[name]) * 1e3:8.1f} ms"
        if per_run[name]:
            h = statistics.median(per_run[name])
            line += f"   health {h * 1e3:6.2f} ms per run, {h / n * 1e3:.3f} ms per layer"
            if a.repeat:
                b = statistics.median(alone[name])
                line += f"   (alone, least of {a.repeat}: {b / n * 1e3:.3f} ms per layer)"
        print(line)
    for name, prof in profs.items():
        print(f"--- cProfile of {name}'s health calls (last round)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
