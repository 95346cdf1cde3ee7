"""Before/after on a noisy machine: two checkouts of bn-diff timed in alternating processes.

    git worktree add ../bn-diff-base <commit>
    PYTHONPATH=. python bench/ab_checkouts.py ../bn-diff-base . --mode train --kernel compiled

Each process imports bn-diff from one checkout, builds the ResNet-50-style (or MobileNet-style)
network of that checkout's examples/models.py, warms up, and times --rounds pairs of a plain
`no_grad` forward and `bn_diff.run(...)`. The checkouts take turns, --turns times each, so that the
machine's slow and fast spells fall on both. A whole run's time scatters by ±15 % here with the
plain forward, so the figure to compare is each process's median overhead (checked minus plain),
printed per process and summarised per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, statistics, sys, time
root, model, mode, kernel, batch, rounds = sys.argv[1:7]
sys.path.insert(0, root + "/examples"); sys.path.insert(0, root)
import models, torch, bn_diff
torch.set_num_threads(2)
build = models.resnet50_style if model == "resnet50" else models.mobilenet_style
net = models.calibrate(build(), (8, 3, 64, 64), batches=2).train(mode == "train")
x = torch.randn(int(batch), 3, 224, 224, generator=torch.Generator().manual_seed(0))
def plain():
    with torch.no_grad():
        net(x)
def run():
    bn_diff.run(net, x, kernel=kernel)
run(); run(); plain()
over, ratio = [], []
for _ in range(int(rounds)):
    t = time.perf_counter(); plain(); p = time.perf_counter() - t
    t = time.perf_counter(); run(); q = time.perf_counter() - t
    over.append((q - p) * 1e3); ratio.append(q / p)
print(json.dumps({"overhead_ms": statistics.median(over), "ratio": statistics.median(ratio)}))
"""


def one(root: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-c", _CHILD, str(root), args.model, args.mode, args.kernel]
    cmd += [str(args.batch), str(args.rounds)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("before", type=Path, help="checkout of the old code")
    ap.add_argument("after", type=Path, help="checkout of the new code")
    ap.add_argument("--model", choices=("resnet50", "mobilenet"), default="resnet50")
    ap.add_argument("--mode", choices=("eval", "train"), default="eval")
    ap.add_argument("--kernel", choices=("auto", "compiled", "eager"), default="compiled")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--turns", type=int, default=3)
    args = ap.parse_args()
    roots = {"before": args.before.resolve(), "after": args.after.resolve()}
    seen: dict[str, list[dict[str, float]]] = {k: [] for k in roots}
    print(f"{args.model}, {args.mode}, batch {args.batch}, kernel {args.kernel}")
    for turn in range(args.turns):
        for name, root in roots.items():
            r = one(root, args)
            seen[name].append(r)
            print(
                f"  turn {turn + 1} {name:6s}: overhead {r['overhead_ms']:6.1f} ms, "
                f"ratio {r['ratio']:.2f}x  ({root})"
            )
    for name, rs in seen.items():
        over = ", ".join(f"{r['overhead_ms']:.0f}" for r in rs)
        med = statistics.median(r["overhead_ms"] for r in rs)
        print(f"{name:6s} overhead per process (ms): {over}; median {med:.0f}")


if __name__ == "__main__":
    main()
