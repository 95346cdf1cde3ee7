"""Where a checked forward spends its time, stage by stage, inside real `bn_diff.run` calls.

    PYTHONPATH=. python bench/stages.py                          # ResNet-50-style, eval, batch 8
    PYTHONPATH=. python bench/stages.py --mode train --kernel eager --model mobilenet

Wraps the pipeline's per-layer functions with wall-clock timers (about 1 µs each), then times
--rounds rounds of a plain `no_grad` forward followed by `bn_diff.run`, after two warm-up runs.
Prints the median plain and checked times, and each stage's time per run and per BN layer
(stages nest: `check_call` includes `fused_check`, which includes `fused_pass` ...).

cProfile makes Python-heavy code look 1.5-2x slower than it is; these timers do not, so these are
the figures to compare before and after a change to the per-layer work. Small torch calls cost
several times more inside a hook than in a warm loop (the model's convolutions have just evicted
the caches), which is why a stage here can cost more than in bench/bench_layer.py.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import torch  # noqa: E402

import bn_diff  # noqa: E402
from bn_diff import (  # noqa: E402
    capture,
    fused,
    fused_locate,
    fused_verdict,
    health,
    kernels,
    layer_check,
    pipeline,
)
from bn_diff.channel_table import ChannelTable  # noqa: E402

_acc: collections.defaultdict[str, float] = collections.defaultdict(float)


def _timed(label: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            _acc[label] += time.perf_counter() - t

    return wrapper


def instrument() -> None:
    """Put a timer around each stage (module attributes, so callers pick the wrapper up)."""
    for mod, name in [
        (pipeline, "check_call"),
        (layer_check, "fused_check"),
        (layer_check, "_train_eval_gap"),
        (layer_check, "_check_running_update"),
        (fused, "fused_pass"),
        (fused, "_compiled_pass"),
        (fused, "_pivot"),
        (kernels, "call"),
        (kernels, "wanted"),
        (fused_verdict, "verdict"),
        (fused_locate, "locate"),
        (fused_verdict, "_exact"),
    ]:
        setattr(mod, name, _timed(name, getattr(mod, name)))  # a renamed stage fails here
    of = fused_verdict.Host.of.__func__  # type: ignore[attr-defined]
    fused_verdict.Host.of = classmethod(_timed("Host.of", of))  # type: ignore[method-assign,assignment]
    health.HealthCheck.__call__ = _timed("health", health.HealthCheck.__call__)  # type: ignore[method-assign]
    for name in ("__enter__", "__exit__"):
        setattr(capture.Capture, name, _timed(f"Capture.{name}", getattr(capture.Capture, name)))
    ChannelTable.adopt = classmethod(  # type: ignore[method-assign,assignment]
        _timed("ChannelTable.adopt", ChannelTable.adopt.__func__)  # type: ignore[attr-defined]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=("resnet50", "mobilenet"), default="resnet50")
    ap.add_argument("--mode", choices=("eval", "train"), default="eval")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kernel", choices=kernels.POLICIES, default="compiled")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    build = models.resnet50_style if args.model == "resnet50" else models.mobilenet_style
    net = models.calibrate(build(), (8, 3, 64, 64), batches=2)
    net.train(args.mode == "train")
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    layers = len(pipeline.bn_layer_names(net))
    instrument()
    kernels.set_policy(args.kernel)
    for _ in range(2):
        bn_diff.run(net, x, mode="as-is")
    plain: list[float] = []
    checked: list[float] = []
    total: collections.defaultdict[str, float] = collections.defaultdict(float)
    for _ in range(args.rounds):
        with torch.no_grad():
            t = time.perf_counter()
            net(x)
            plain.append(time.perf_counter() - t)
        _acc.clear()
        t = time.perf_counter()
        bn_diff.run(net, x, mode="as-is")
        checked.append(time.perf_counter() - t)
        for k, v in _acc.items():
            total[k] += v
    p, c = statistics.median(plain), statistics.median(checked)
    print(
        f"{args.model}, {args.mode}, batch {args.batch}, kernel {args.kernel}, "
        f"{torch.get_num_threads()} threads, {layers} BN layers, median of {args.rounds}:"
    )
    print(f"  plain forward {p * 1e3:.1f} ms, bn_diff.run {c * 1e3:.1f} ms: {c / p:.2f}x")
    print(f"  {'stage':28s} {'ms per run':>10s} {'µs per layer':>13s}")
    for name, v in sorted(total.items(), key=lambda kv: -kv[1]):
        per_run = v / args.rounds
        print(f"  {name:28s} {per_run * 1e3:10.1f} {per_run / layers * 1e6:13.0f}")


if __name__ == "__main__":
    main()
