"""The "fold" train kernel (bn_diff/kernels.py) against variants of its arithmetic, side by side.

    PYTHONPATH=. python bench/kernel_variants.py

Compiles, in one process, the kernel as shipped and variants of its per-element work (the
residuals' max and min instead of their greatest magnitude, as before session 4; no sample-0
sums; x - p folded into the affine map; the relative difference divided in float32; no division
at all, which the verdict cannot do without, as a floor), then times each on ResNet-50's fold
shapes at batch 8 (and one at 32): the minimum over --rounds rounds of 5 calls, in ns per element.
The "kept" line is the shipped kernel (kernels.py's own); the others restate its arithmetic with
one change each, to measure it against.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bn_diff import kernels  # noqa: E402

F64 = torch.float64
F32 = torch.float32
R = (0, 2)  # "fold": a slot per channel


def variant(kind: str) -> Callable[..., Any]:
    def train(x, y, p, g, b, eps):  # type: ignore[no-untyped-def]
        xd = x.to(F64) - p
        s1, s2 = xd.sum(R), (xd * xd).sum(R)
        m = x.shape[0] * x.shape[2]
        mean_p = s1 / m
        var = torch.clamp_min(s2 - s1 * mean_p, 0.0) / m
        a = g / torch.sqrt(var.unsqueeze(-1) + eps)
        na, nb = -a, a * mean_p.unsqueeze(-1) - b
        ne = na * x.to(F64) + (nb - na * p) if kind == "fold_p" else na * xd + nb
        r = y.to(F64) + ne
        if kind == "f32_div":
            q = (r.to(F32) / ne.to(F32)).to(F64)
        else:
            q = r if kind == "no_div" else r / ne
        ext = (x.amax(R).to(F64), x.amin(R).to(F64))
        out: tuple[torch.Tensor, ...]
        if kind == "minmax":
            out = (s1, s2, torch.stack((r.amax(R), q.amax(R))), torch.stack((r.amin(R), q.amin(R))))
        else:
            out = (s1, s2, torch.stack((r.abs().amax(R), q.abs().amax(R))))
        out += ext
        if kind != "no_sample0":
            x0, xd0 = x[:1], xd[:1]
            out += (xd0.sum(R), (xd0 * xd0).sum(R), x0.amax(R).to(F64), x0.amin(R).to(F64))
        return out

    return torch.compile(train, dynamic=True, fullgraph=True, options=kernels._options())


KINDS = {
    "kept (greatest magnitudes, sample 0)": "kept",
    "max and min of r and q (before session 4)": "minmax",
    "kept, without sample 0's sums": "no_sample0",
    "kept, x - p folded into the affine map": "fold_p",
    "kept, q divided in float32": "f32_div",
    "no division at all (a floor, not an option)": "no_div",
}
SHAPES = [(8, 64, 3136), (8, 512, 784), (8, 1024, 196), (8, 2048, 49), (32, 512, 784)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the shipped kernel itself for "kept"; the variants re-state its arithmetic with one change
    fns = {
        label: kernels._kernel(("fold", "train")) if kind == "kept" else variant(kind)
        for label, kind in KINDS.items()
    }
    cells: dict[str, list[str]] = {label: [] for label in fns}
    for shape in SHAPES:
        c = shape[1]
        x, y = torch.randn(*shape), torch.randn(*shape)
        p = torch.zeros(c, 1, dtype=F64)
        call = (x, y, p, p + 1, p, torch.full((1, 1), 1e-5, dtype=F64))
        best = {label: float("inf") for label in fns}
        for fn in fns.values():
            fn(*call)  # compile
        for _ in range(args.rounds):  # variants take turns within each round
            for label, fn in fns.items():
                t = time.perf_counter()
                for _ in range(5):
                    fn(*call)
                best[label] = min(best[label], (time.perf_counter() - t) / 5 / x.numel() * 1e9)
        for label in fns:
            cells[label].append(f"{best[label]:.2f}")
    print(
        "| fold train kernel (ns per element) | "
        + " | ".join("x".join(map(str, s)) for s in SHAPES)
        + " |"
    )
    print("|---|" + "---|" * len(SHAPES))
    for label, row in cells.items():
        print(f"| {label} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
