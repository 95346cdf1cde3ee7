"""What one small operation costs inside a BN hook, the first and the second time.

    PYTHONPATH=. python bench/hook_op_cost.py

Runs `bn_diff.run` on the ResNet-50-style network (batch 8, eval) with a probe before each layer's
check: the same torch call on two (256,) float64 vectors twice, then the same NumPy call twice.
Prints the medians over the layers of three runs, and the same call in a warm loop.

The first call of a kind right after the model's own work costs several times the second: the
convolution has evicted the code and data the call needs, not the vectors. So the host work per
layer grows with the number of different kinds of calls it makes, whether torch or NumPy, more
than with the number of calls or their size.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import bn_diff  # noqa: E402
from bn_diff import pipeline  # noqa: E402
from bn_diff.capture import BnCall  # noqa: E402
from bn_diff.layer_check import check_call  # noqa: E402
from bn_diff.results import LayerResult, Tolerance  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    net = models.calibrate(models.resnet50_style(), (8, 3, 64, 64), batches=2).eval()
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    a, b = torch.rand(256, dtype=torch.float64), torch.rand(256, dtype=torch.float64)
    an, bn = a.numpy(), b.numpy()
    times: dict[str, list[float]] = {
        k: [] for k in ("torch 1st", "torch 2nd", "numpy 1st", "numpy 2nd")
    }

    def probe(call: BnCall, tol: Tolerance) -> LayerResult:
        t0 = time.perf_counter()
        torch.add(a, b)
        t1 = time.perf_counter()
        torch.add(a, b)
        t2 = time.perf_counter()
        np.add(an, bn)
        t3 = time.perf_counter()
        np.add(an, bn)
        t4 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[key].append(dt)
        return check_call(call, tol)

    pipeline.check_call = probe  # type: ignore[assignment]
    for _ in range(3):
        bn_diff.run(net, x)
    print("ResNet-50-style, eval, batch 8: one add of two (256,) float64 vectors in each BN hook")
    for key, v in times.items():
        print(f"  {key:10s} {statistics.median(v) * 1e6:6.1f} µs (median of {len(v)})")
    for name, f in (("torch", lambda: torch.add(a, b)), ("numpy", lambda: np.add(an, bn))):
        t = time.perf_counter()
        for _ in range(1000):
            f()
        print(f"  {name} in a warm loop {(time.perf_counter() - t) / 1000 * 1e6:6.1f} µs")


if __name__ == "__main__":
    main()
