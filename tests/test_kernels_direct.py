"""The kernels compiled without dynamo (bn_diff/kernels_direct.py): the same bits as
torch.compile's, one variant for every size of at least 2, guards that refuse what a variant
was not compiled for (sizes of 1, strided views, other dtypes), a limit on variants that the
caller sees as a failure, and no dynamo at call time.

Each new variant compiles in a second or two (the first in a process several); the shapes are
few and small on purpose.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from test_fused import assert_same, make_case

from bn_diff import kernels, kernels_direct
from bn_diff.pipeline import make_tolerance
from bn_diff.recompute import F64

pytestmark = [
    pytest.mark.skipif(
        sys.platform == "win32", reason="inductor's C++ kernels need a compiler setup CI lacks"
    ),
    pytest.mark.skipif(not kernels_direct.available(), reason="torch without standalone_compile"),
]


@pytest.fixture
def compiled() -> Iterator[None]:
    kernels.set_policy("compiled")
    kernels.reset()
    kernels._compiled.clear()
    try:
        yield
    finally:
        kernels.set_policy(None)
        kernels.reset()
        kernels._compiled.clear()


def train_args(n: int, c: int, length: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Arguments of the fold "train" kernel: x, y (N, C, L) float32; p, g, b (C, 1); eps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=gen) * 3 + 1
    y = torch.randn(n, c, length, generator=gen)
    p = x.to(F64).mean(dim=(0, 2)).view(-1, 1)
    g = torch.rand(c, 1, dtype=F64, generator=gen) + 0.5
    b = torch.randn(c, 1, dtype=F64, generator=gen)
    return x, y, p, g, b, torch.full((1, 1), 1e-5, dtype=F64)


_DYNAMO: dict[str, Callable[..., Any]] = {}


def by_dynamo(name: str, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same fold kernel compiled by torch.compile, as a torch without standalone_compile
    gets it."""
    fn = _DYNAMO.get(name)
    if fn is None:
        src = kernels._SOURCES["fold"][name]
        fn = _DYNAMO[name] = torch.compile(src, dynamic=True, fullgraph=True)
    with torch.no_grad():
        return tuple(fn(*args))


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(
        u.shape == v.shape and u.dtype == v.dtype and torch.equal(u, v)
        for u, v in zip(a, b, strict=True)
    )


def test_one_variant_serves_every_size_of_at_least_two_and_gives_dynamos_bits() -> None:
    k = kernels_direct.Direct(kernels._SOURCES["fold"]["train"], kernels._options())
    # equal sizes (6, 6) must not make C and L one symbol ("duck sizing"): (6, 7) would not fit
    for shape in [(2, 6, 6), (3, 6, 7), (4, 9, 2), (2, 2, 33)]:
        args = train_args(*shape)
        assert same(tuple(k(*args)), by_dynamo("train", *args)), shape
    assert k.variants == 1


def test_a_batch_of_one_is_its_own_variant_and_the_first_still_serves_the_rest() -> None:
    k = kernels_direct.Direct(kernels._SOURCES["fold"]["train"], kernels._options())
    one, many = train_args(1, 5, 8, seed=1), train_args(3, 5, 8, seed=2)
    out_one = tuple(k(*one))
    assert len(out_one) == 5  # the batch-of-one branch: no sample-0 sums
    assert same(out_one, by_dynamo("train", *one))
    out_many = tuple(k(*many))
    assert len(out_many) == 9 and same(out_many, by_dynamo("train", *many))
    assert k.variants == 2
    assert same(tuple(k(*one)), out_one) and k.variants == 2


def test_strided_views_are_not_run_by_a_variant_compiled_for_contiguous_tensors() -> None:
    k = kernels_direct.Direct(kernels._SOURCES["fold"]["full"], kernels._options())
    gen = torch.Generator().manual_seed(3)
    big_x, big_y = torch.randn(3, 9, 10, generator=gen), torch.randn(3, 9, 10, generator=gen)
    p = torch.zeros(4, 1, dtype=F64)
    na = -torch.rand(4, 1, dtype=F64, generator=gen)
    nb = torch.randn(4, 1, dtype=F64, generator=gen)
    whole = (big_x[:, :4].contiguous(), big_y[:, :4].contiguous(), p, na, nb)
    assert same(tuple(k(*whole)), by_dynamo("full", *whole))
    for c0 in (0, 2, 5):  # channel slices: other strides, then other storage offsets
        view = (big_x[:, c0 : c0 + 4], big_y[:, c0 : c0 + 4], p, na, nb)
        assert same(tuple(k(*view)), by_dynamo("full", *view)), c0
    assert k.variants >= 2


def test_half_precision_is_its_own_variant() -> None:
    k = kernels_direct.Direct(kernels._SOURCES["fold"]["train"], kernels._options())
    args = train_args(2, 3, 5, seed=4)
    half = (args[0].half(), args[1].half(), *args[2:])
    assert same(tuple(k(*args)), by_dynamo("train", *args))
    assert same(tuple(k(*half)), by_dynamo("train", *half))
    assert k.variants == 2


def test_past_the_variant_limit_the_layer_goes_to_the_eager_pass(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels_direct, "VARIANTS", 1)
    assert_same(make_case((2, 3, 4, 5), torch.float32, True, seed=1), make_tolerance(None, None))
    assert kernels.status()["failure"] is None and kernels.status()["compiled_layers"] == 1
    # a batch of one needs a second variant: refused, and the eager pass gives the verdict
    case = make_case((1, 3, 4, 5), torch.float32, True, seed=2)
    case["y"][0, 1, 2, 3] += 1.0  # type: ignore[index]
    fast = assert_same(case, make_tolerance(None, None))
    assert fast.comparison.mismatched == 1
    failure = str(kernels.status()["failure"])
    assert "recompile" in failure and "variants" in failure  # the run's hint: --kernel eager


def test_a_failing_standalone_compile_falls_back_to_the_eager_pass(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor

    def broken(*a: object, **k: object) -> object:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch._inductor, "standalone_compile", broken)
    case = make_case((2, 3, 12, 12), torch.float32, False, seed=6)
    case["y"][1, 2, 3, 4] -= 0.5  # type: ignore[index]
    assert assert_same(case, make_tolerance(None, None)).comparison.mismatched == 1
    assert kernels.status()["compiled_layers"] == 0
    assert "No working C++ compiler" in str(kernels.status()["failure"])


def test_calls_go_through_neither_torch_compile_nor_dynamos_settings(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._dynamo

    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile used"))
    cfg = torch._dynamo.config
    seen: list[object] = []
    real = kernels_direct.Direct.__call__

    def spy(self: kernels_direct.Direct, *args: torch.Tensor) -> Any:
        seen.append((cfg.recompile_limit, cfg.suppress_errors))
        return real(self, *args)

    monkeypatch.setattr(kernels_direct.Direct, "__call__", spy)
    before = (cfg.recompile_limit, cfg.suppress_errors)
    assert_same(make_case((2, 3, 4, 5), torch.float32, True, seed=3), make_tolerance(None, None))
    assert kernels.status()["compiled_layers"] == 1
    assert seen == [before]  # called once, with the settings as the user has them


def test_threads_compiling_the_same_variant_compile_it_once() -> None:
    k = kernels_direct.Direct(kernels._SOURCES["fold"]["train"], kernels._options())
    args = train_args(3, 4, 6, seed=5)
    outs: list[tuple[torch.Tensor, ...]] = []

    def work() -> None:
        with torch.no_grad():
            outs.append(tuple(k(*args)))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outs) == 3 and all(same(o, outs[0]) for o in outs)
    assert k.variants == 1


def test_signature_tells_dtypes_devices_and_dimensions_apart() -> None:
    a = torch.zeros(2, 3)
    sig = kernels_direct.signature
    assert sig((a,)) == sig((torch.ones(5, 7),))
    assert sig((a,)) != sig((a.double(),))
    assert sig((a,)) != sig((a.view(6),))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_give_dynamos_bits_and_keep_devices_apart() -> None:
    """On a GPU (Triton): the same bits as torch.compile's kernel, and a CPU call after a CUDA
    one compiles its own variant (the device is part of a variant's signature)."""
    k = kernels_direct.Direct(kernels._SOURCES["fold"]["train"], kernels._options())
    for shape in [(4, 6, 49), (3, 7, 50)]:
        cpu = train_args(*shape)
        gpu = tuple(a.cuda() for a in cpu)
        assert same(tuple(k(*gpu)), by_dynamo("train", *gpu)), shape
    assert k.variants == 1
    cpu = train_args(2, 3, 5)
    assert same(tuple(k(*cpu)), by_dynamo("train", *cpu))
    assert k.variants == 2
