"""Benchmark: what building `LayerResult.channels` costs in `bn_diff.run`, lazy vs eager.

    python bench/bench_channels.py                # ResNet-50-style, batch 8, 3x224x224, eval
    python bench/bench_channels.py --threads 2 --runs 7

In one process, after a warm-up, rounds of: the plain no_grad forward, `bn_diff.run` as it is
(`ChannelTable`: no `ChannelStats` object until one is read), and `bn_diff.run` with the tail of
`check_call` patched back to the eager tuple it replaced (ten `.tolist()` and one `ChannelStats`
per channel); each with and without the health checks. Prints the median of each and the median
per-round difference. Then the channel building alone, on the real layers' columns: the eager
tuple, `ChannelTable.from_columns`, and that table with every channel read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from bn_diff.channel_table import FIELDS  # noqa: E402

ORDER = FIELDS[1:]
"""ChannelStats's fields after `index`: the order of the old eager tail's columns."""


def eager_channels(**cols: Any) -> tuple[Any, ...]:
    """The tail of `check_call` before ChannelTable, verbatim in effect."""
    from bn_diff.results import ChannelStats

    c = int(cols["mismatched"].numel())
    none = [None] * c
    return tuple(
        map(
            ChannelStats,
            range(c),
            *(none if cols[k] is None else cols[k].tolist() for k in ORDER),
        )
    )


class Eager:
    """Stands in for `ChannelTable` in `bn_diff.layer_check` to time the old way."""

    from_columns = staticmethod(eager_channels)

    @staticmethod
    def adopt(src: Any, rows: dict[str, int], mismatched: Any) -> tuple[Any, ...]:
        """What `check_call` hands the table (its host rows), as the old eager tuple."""
        import torch

        cols: dict[str, Any] = {k: src[rows[k]] if k in rows else None for k in ORDER}
        cols["mismatched"] = mismatched.to(torch.int64)
        return eager_channels(**cols)


def once(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def once_wall_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall time, and the process's CPU time (less sensitive to other work on the machine)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def median_time(fn: Callable[[], Any], runs: int) -> float:
    return statistics.median(once(fn) for _ in range(runs))


def column(ch: list[Any], name: str) -> Any:
    import torch

    values = [getattr(c, name) for c in ch]
    if any(v is None for v in values):
        return None
    return torch.tensor(values, dtype=torch.int64 if name == "mismatched" else torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mode", default="eval")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import models
    import torch

    import bn_diff
    from bn_diff import layer_check
    from bn_diff.channel_table import ChannelTable

    if args.threads:
        torch.set_num_threads(args.threads)
    net = models.calibrate(models.resnet50_style(), (2, 3, 224, 224), batches=2)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def plain() -> None:
        with torch.no_grad():
            net(x)

    def checked(eager: bool, health: bool = True) -> Callable[[], Any]:
        def go() -> Any:
            vars(layer_check)["ChannelTable"] = Eager if eager else ChannelTable
            try:
                report = bn_diff.run(net, x, mode=args.mode, health=health)
            finally:
                vars(layer_check)["ChannelTable"] = ChannelTable
            kind = tuple if eager else ChannelTable
            assert all(isinstance(lr.channels, kind) for lr in report.layers), "patch missed"
            return report

        return go

    cases: dict[str, Callable[[], Any]] = {
        "plain forward": plain,
        "run, lazy ChannelTable": checked(False),
        "run, eager tuple (before)": checked(True),
        "run health=False, lazy": checked(False, health=False),
        "run health=False, eager (before)": checked(True, health=False),
    }
    report = checked(False)()
    assert report.to_json() == checked(True)().to_json(), "lazy and eager reports differ"
    plain()
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for k, fn in cases.items():
            w, c = once_wall_cpu(fn)
            times[k].append(w)
            cpu[k].append(c)

    n = sum(len(lr.channels) for lr in report.layers)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; resnet50_style batch "
        f"{args.batch} {args.mode}: {len(report.layers)} BN calls, {n} channels, "
        f"ok={bool(report)}; median of {args.runs} rounds"
    )
    for k, v in times.items():
        print(
            f"  {k:<34} wall {statistics.median(v) * 1e3:6.1f} ms, CPU "
            f"{statistics.median(cpu[k]) * 1e3:6.1f} ms   (wall: "
            f"{', '.join(f'{t * 1e3:.0f}' for t in v)})"
        )
    for lazy_k, eager_k in (
        ("run, lazy ChannelTable", "run, eager tuple (before)"),
        ("run health=False, lazy", "run health=False, eager (before)"),
    ):
        d = [e - la for la, e in zip(times[lazy_k], times[eager_k], strict=True)]
        dc = [e - la for la, e in zip(cpu[lazy_k], cpu[eager_k], strict=True)]
        print(
            f"  saved per run ({lazy_k.split(',')[0]}): median of the rounds' differences: "
            f"wall {statistics.median(d) * 1e3:.1f} ms, CPU {statistics.median(dc) * 1e3:.1f} ms"
        )

    # the channel building alone, on the real layers' columns
    cols = [{k: column(list(lr.channels), k) for k in ORDER} for lr in report.layers]

    def old() -> None:
        for t in cols:
            eager_channels(**t)

    def lazy() -> list[ChannelTable]:
        return [ChannelTable.from_columns(**t) for t in cols]

    def lazy_all() -> None:
        for tab in lazy():
            tuple(tab)

    print("channel building alone, all layers of one run (median of 9):")
    print(f"  eager tuple (before)                {median_time(old, 9) * 1e3:6.2f} ms")
    print(f"  ChannelTable.from_columns           {median_time(lazy, 9) * 1e3:6.2f} ms")
    print(f"  ... then every channel read         {median_time(lazy_all, 9) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
