"""Per-layer cost of one BN check, isolated: the compiled pass alone, `fused_check`, `check_call`.

    python bench/bench_layer.py                      # eval, (8, 256, 14, 14) float32
    python bench/bench_layer.py --mode train --shape 8,64,56,56

Repeats each on one layer (min of 5 rounds of --reps calls, µs per call) with the compiled kernel;
"non-kernel" is what the verdict adds to the pass. The kernel evicts the caches between calls as
in a real run, but a real run's hooks see colder code than this loop: take the differences, not the
absolute figures, to a whole forward.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bn_diff import kernels  # noqa: E402
from bn_diff.capture import BnCall, Capture  # noqa: E402
from bn_diff.fused import BnArgs, _compiled_pass, _pivot, fused_check, view3  # noqa: E402
from bn_diff.pipeline import check_call, make_tolerance  # noqa: E402


def per_call(f: Callable[[], object], reps: int) -> float:
    f()
    f()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("eval", "train"), default="eval")
    ap.add_argument("--shape", default="8,256,14,14")
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    kernels.set_policy("compiled")
    bn = torch.nn.BatchNorm2d(shape[1]) if len(shape) == 4 else torch.nn.BatchNorm1d(shape[1])
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.train(args.mode == "train")
    x = torch.randn(*shape)
    calls: list[BnCall] = []
    net = torch.nn.Sequential(bn)
    with Capture(net, calls.append, "as-is"), torch.no_grad():
        net(x)
    call = calls[0]
    x, y = call.x, call.y
    f64 = torch.float64
    g, b = bn.weight.detach().to(f64), bn.bias.detach().to(f64)
    rm, rv = call.running_mean_before, call.running_var_before
    assert rm is not None and rv is not None
    rm, rv = rm.to(f64), rv.to(f64)
    batch, tol = call.use_batch_stats, make_tolerance(None, None)
    xv, yv = view3(x), view3(y)
    assert xv is not None and yv is not None

    def kernel() -> object:
        args = BnArgs(g, b, rm, rv, batch, bn.eps)
        return _compiled_pass(xv, yv, args, 1 << 18, _pivot(xv))

    def fused() -> object:
        return fused_check(x, y, g, b, rm, rv, batch, bn.eps, tol)

    def whole() -> object:
        return check_call(call, tol)

    tk, tf, tc = (per_call(f, args.reps) for f in (kernel, fused, whole))
    print(f"{args.mode} {shape} float32, {torch.get_num_threads()} threads, µs per call:")
    print(f"  pivot + compiled pass {tk:7.0f}")
    print(f"  fused_check           {tf:7.0f}   non-kernel {tf - tk:5.0f}")
    print(f"  check_call            {tc:7.0f}   non-kernel {tc - tk:5.0f}")
    print(f"  compiled layers: {kernels.status()['compiled_layers']}")


if __name__ == "__main__":
    main()
