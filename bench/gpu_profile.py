"""Where a checked forward spends its time on a GPU: cProfile of one bn_diff.run (eval, batch 64).

PYTHONPATH=. python3 bench/gpu_profile.py [cuda|cpu] [batch]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402

import bn_diff  # noqa: E402


def main(device: str, batch: int) -> None:
    net = models.calibrate(models.resnet50_style(), (8, 3, 64, 64), batches=2).to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    for _ in range(2):
        bn_diff.run(net, x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    bn_diff.run(net, x)
    sync()
    print(f"one bn_diff.run: {time.perf_counter() - t:.3f} s on {device}, batch {batch}")
    prof = cProfile.Profile()
    prof.enable()
    bn_diff.run(net, x)
    sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "cuda", int(sys.argv[2]) if len(sys.argv) > 2 else 64
    )
