"""The working set of a check is bounded by the block size: no float64 (or float32) twin of an
activation, whatever its size; and no activation outlives the hook that checked it."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from bn_diff import fused, recompute
from bn_diff.fused import fused_check, plan, region
from bn_diff.pipeline import make_tolerance, reference_check
from bn_diff.recompute import F64, chunk_slices

ROOT = Path(__file__).resolve().parent.parent


class LargestOutput(TorchDispatchMode):
    """Records the largest fresh tensor (not a view of, nor written into, an argument) any aten
    op allocates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        known = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known:
                self.largest = max(self.largest, t.numel())
        return out


def covered(shape: tuple[int, ...], blocks: list[tuple[slice, ...]]) -> torch.Tensor:
    hits = torch.zeros(shape, dtype=torch.int64)
    for idx in blocks:
        hits[idx] += 1
    return hits


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5).map(tuple),
    target=st.integers(1, 400),
)
def test_chunk_slices_cover_once_in_order_within_target(
    shape: tuple[int, ...], target: int
) -> None:
    blocks = list(chunk_slices(shape, target))
    assert all(
        math.prod(s.stop - s.start for s in idx) * math.prod(shape[len(idx) :]) <= target
        for idx in blocks
    )
    assert bool((covered(shape, blocks) == 1).all())
    firsts = [tuple(s.start for s in idx) + (0,) * (len(shape) - len(idx)) for idx in blocks]
    assert firsts == sorted(firsts)  # (n, c, *s) order: the first maximum is the reference's


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 6), c=st.integers(1, 6), length=st.integers(1, 50), target=st.integers(1, 300)
)
def test_fused_blocks_cover_once_within_target(n: int, c: int, length: int, target: int) -> None:
    per, groups = plan(n, c, length, target)
    hits = torch.zeros(n, c, length, dtype=torch.int64)
    for group in groups:
        assert {(b.cs.start, b.cs.stop) for b in group} == {(group[0].cs.start, group[0].cs.stop)}
        assert len(group) == per
        for k, blk in enumerate(group):
            assert blk.numel <= target
            hits[blk.ns, blk.cs, blk.ls] += 1
            if per > 1:
                assert (blk.ns, blk.ls) == region(k, n, length, target)
    assert bool((hits == 1).all())


def test_the_check_never_materialises_an_activation_sized_tensor() -> None:
    """Every tensor any op creates inside fused_check is at most the scratch of one block, even
    when faulty channels go through the reference path and planes are split."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 96, 96, generator=g)  # 55k elements; blocks of 1000 below
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    gamma, beta = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    y = F.batch_norm(x, None, None, training=True)
    y[:, 1] += 0.1  # a faulty channel: the reference path runs on it
    old = recompute.CHUNK_ELEMS
    recompute.CHUNK_ELEMS = 1000
    try:
        for train in (True, False):
            spy = LargestOutput()
            with spy:
                res = fused_check(
                    x, y, gamma, beta, rm, rv, train, 1e-5, make_tolerance(None, None), target=1000
                )
            assert res is not None and res.exact_channels >= 1
            assert 0 < spy.largest <= 3 * 1000, spy.largest
            spy = LargestOutput()
            with spy:
                reference_check(x, y, gamma, beta, rm, rv, train, 1e-5, make_tolerance(None, None))
            assert 0 < spy.largest <= 1000 * 2, spy.largest
    finally:
        recompute.CHUNK_ELEMS = old
        fused.release_scratch()


def test_scratch_is_bounded_by_the_block_size() -> None:
    x = torch.randn(4, 8, 64, 64)
    y = F.batch_norm(x, None, None, training=True)
    fused.release_scratch()
    ones, zeros = torch.ones(8, dtype=F64), torch.zeros(8, dtype=F64)
    fused_check(x, y, ones, zeros, None, None, True, 1e-5, make_tolerance(None, None), target=5000)
    bufs = fused._local.bufs
    assert sum(t.numel() for t in bufs.values()) <= 3 * 5000
    fused.release_scratch()


def test_no_activation_outlives_its_hook() -> None:
    """After bn_diff.run returns, nothing of bn-diff's holds a BN input or output."""
    import bn_diff

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1),
        torch.nn.BatchNorm2d(4),
    ).eval()
    refs: list[weakref.ref[torch.Tensor]] = []

    def keep(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        refs.extend([weakref.ref(args[0]), weakref.ref(out)])

    handles = [net[i].register_forward_hook(keep) for i in (1, 4)]
    report = bn_diff.run(net, torch.randn(2, 3, 10, 10))
    for h in handles:
        h.remove()
    assert len(report.layers) == 2 and len(refs) == 4
    gc.collect()
    assert [r() for r in refs] == [None] * 4


def test_a_huge_activation_gets_no_float64_twin(tmp_path: Path) -> None:
    """A 256 MiB float32 activation (one 8192x8192 plane), checked by the fused path and, for a
    faulty output, by the reference path: peak RSS grows by far less than a float64 copy."""
    script = textwrap.dedent(
        """
        import resource, sys, torch
        from bn_diff.fused import fused_check
        from bn_diff.pipeline import make_tolerance
        F64 = torch.float64
        def rss():  # peak RSS in MiB; VmHWM, since ru_maxrss survives fork+exec
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        x = torch.randn(1, 1, 8192, 8192)
        y = x * 0.5  # eval BN with var 3, mean 0: honest, then faulty
        rm, rv = torch.zeros(1, dtype=F64), torch.full((1,), 3.0 - 1e-5, dtype=F64)
        g, b = torch.full((1,), 0.5 * 3.0 ** 0.5, dtype=F64), torch.zeros(1, dtype=F64)
        before = rss()
        r = fused_check(x, y, g, b, rm, rv, False, 1e-5, make_tolerance(None, None))
        assert r.exact_channels == 0, r.exact_channels
        y[0, 0, 100, 100] += 1.0
        r = fused_check(x, y, g, b, rm, rv, False, 1e-5, make_tolerance(None, None))
        assert r.exact_channels == 1 and r.comparison.mismatched == 1
        print(rss() - before)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 64, growth_mib  # a float64 twin alone would be 512 MiB
