"""The compiled kernels (bn_diff/kernels.py) give the reference path's verdict, and the policy that
chooses them behaves: "eager" never compiles, "auto" waits for enough work, a failing compiler
falls back to the eager pass, and no kernel call materialises an activation-sized float64 tensor.

Compiling costs seconds per (layout, kernel, dtype, 0/1-sized axis) in a fresh process: the shapes
here are few and small on purpose.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fused import assert_same, make_case
from torch.utils._python_dispatch import TorchDispatchMode

import bn_diff
from bn_diff import fused, kernels, kernels_direct
from bn_diff.fused import fused_check
from bn_diff.pipeline import make_tolerance
from bn_diff.recompute import F64

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="inductor's C++ kernels need a compiler setup CI lacks there"
)


@pytest.fixture
def compiled() -> Iterator[None]:
    kernels.set_policy("compiled")
    kernels.reset()
    try:
        yield
    finally:
        kernels.set_policy(None)
        kernels.reset()


@pytest.fixture
def dynamo_path(compiled: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernels as torch.compile makes them: what a torch without inductor's standalone
    compile gets (bn_diff/kernels_direct.py)."""
    monkeypatch.setattr(kernels_direct, "available", lambda: False)
    kernels._compiled.clear()
    try:
        yield
    finally:
        kernels._compiled.clear()


def used() -> int:
    return int(kernels.status()["compiled_layers"])


# planes of 1 (BatchNorm1d), < MIN_PLANE ("fold") and >= MIN_PLANE ("rows"); batches of 1 and more
SHAPES = [(3, 5), (2, 3, 4, 5), (1, 4, 16, 16), (3, 2, 12, 13)]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    shape=st.sampled_from(SHAPES),
    train=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    offset=st.sampled_from([(0.0, 1.0), (1000.0, 0.1), (3.0, 0.5)]),
    fault=st.sampled_from(["none", "one", "channel", "nan"]),
)
def test_compiled_kernel_equals_reference(
    compiled: None,
    shape: tuple[int, ...],
    train: bool,
    seed: int,
    offset: tuple[float, float],
    fault: str,
) -> None:
    case = make_case(shape, torch.float32, train, seed, *offset)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    flat = y.view(-1)
    if fault == "one":
        flat[seed % flat.numel()] += 0.01
    elif fault == "channel":
        y[:, seed % shape[1]] *= 1.001
    elif fault == "nan":
        flat[seed % flat.numel()] = float("nan")
    before = used()
    assert_same(case, make_tolerance(None, None))
    assert used() > before  # the kernel, not the eager pass, did it (a redo pass counts again)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_half_precision_layers(compiled: None, dtype: torch.dtype, train: bool) -> None:
    case = make_case((2, 3, 12, 12), dtype, train, seed=5)
    assert_same(case, make_tolerance(None, None))
    assert used() == 1


def test_float64_layers_stay_on_the_eager_pass(compiled: None) -> None:
    case = make_case((2, 3, 12, 12), torch.float64, False, seed=1)
    assert_same(case, make_tolerance(None, None))
    assert used() == 0


def test_eager_policy_never_compiles() -> None:
    kernels.set_policy("eager")
    kernels.reset()
    try:
        assert_same(
            make_case((2, 3, 12, 12), torch.float32, True, seed=2), make_tolerance(None, None)
        )
        assert used() == 0 and kernels.status()["checked_elements"] == 2 * 3 * 144
    finally:
        kernels.set_policy(None)


def test_auto_compiles_once_enough_work_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "AUTO_ELEMS", 1000)
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels.set_policy(None)
    kernels.reset()
    try:
        tol = make_tolerance(None, None)
        assert_same(make_case((2, 3, 12, 12), torch.float32, False, seed=3), tol)  # 864 so far
        assert used() == 0
        assert_same(make_case((2, 3, 12, 12), torch.float32, False, seed=4), tol)  # 1728
        assert used() == 1 and kernels.status()["policy"] == "auto"
    finally:
        kernels.reset()


def test_policy_from_environment_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels.set_policy(None)
    monkeypatch.setenv(kernels.ENV, "Eager")
    assert kernels.policy() == "eager"
    monkeypatch.setenv(kernels.ENV, "nonsense")
    assert kernels.policy() == "auto"
    with pytest.raises(ValueError, match="auto, compiled, eager"):
        kernels.set_policy("fast")


def test_a_failing_compiler_falls_back_to_the_eager_pass(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(key: tuple[str, str]) -> object:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")

    monkeypatch.setattr(kernels, "_kernel", broken)
    case = make_case((2, 3, 12, 12), torch.float32, True, seed=6)
    case["y"][0, 1, 2, 3] += 1.0  # type: ignore[index]
    fast = assert_same(case, make_tolerance(None, None))
    assert fast.comparison.mismatched == 1
    st_ = kernels.status()
    assert st_["compiled_layers"] == 0
    assert st_["failure"] == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    # off for the rest of the process: the next layer does not try again
    monkeypatch.setattr(kernels, "_kernel", lambda key: pytest.fail("compiled again"))
    assert_same(make_case((2, 3, 12, 12), torch.float32, False, seed=7), make_tolerance(None, None))


def test_run_reports_a_kernel_that_could_not_be_used(
    compiled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(key: tuple[str, str]) -> object:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_kernel", broken)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    report = bn_diff.run(net, torch.randn(2, 3, 14, 14), kernel="compiled")
    assert bool(report)
    (f,) = [f for f in report.findings if f.id == "kernel_unavailable"]
    assert f.severity == "info" and "no compiler" in f.message


def test_no_kernel_under_a_dispatch_mode(compiled: None) -> None:
    """A profiler or memory spy (a Python dispatch mode) sees the eager pass: compiled code under
    one could run its Python source eagerly, on whole float64 tensors."""

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    case = make_case((2, 3, 12, 12), torch.float32, False, seed=8)
    with Spy():
        assert_same(case, make_tolerance(None, None))
    assert used() == 0


def test_run_with_the_compiled_kernel_matches_the_eager_run() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import models

    net = models.calibrate(models.resnet_tiny(), (4, 3, 32, 32), batches=2)
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    for train in (False, True):
        net.train(train)
        eager = bn_diff.run(net, x, kernel="eager")
        fast = bn_diff.run(net, x, kernel="compiled")
        assert [la.mismatched for la in eager.layers] == [la.mismatched for la in fast.layers]
        assert [la.max_abs_index for la in eager.layers] == [la.max_abs_index for la in fast.layers]
        for la, lb in zip(eager.layers, fast.layers, strict=True):
            assert abs(la.max_abs_diff - lb.max_abs_diff) <= 1e-6 * la.max_abs_diff + 1e-15
    assert kernels.status()["compiled_layers"] > 0
    assert kernels.policy() == "auto"  # run(kernel=...) sets the policy for that run only


@pytest.mark.slow
def test_the_compiled_kernel_allocates_no_float64_twin() -> None:
    """A 128 MiB float32 layer checked by the compiled kernel, honest and faulty: peak RSS grows by
    far less than a float64 copy of it (256 MiB) once the kernel is compiled."""
    script = textwrap.dedent(
        """
        import torch
        from bn_diff import kernels
        from bn_diff.fused import fused_check
        from bn_diff.pipeline import make_tolerance
        F64 = torch.float64
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        kernels.set_policy("compiled")
        tol = make_tolerance(None, None)
        def case(n, c, l):
            x = torch.randn(n, c, l)
            rm, rv = torch.zeros(c, dtype=F64), torch.full((c,), 4.0 - 1e-5, dtype=F64)
            g, b = torch.ones(c, dtype=F64), torch.zeros(c, dtype=F64)
            return x, x * 0.5, g, b, rm, rv
        small = case(2, 4, 256)
        fused_check(*small, False, 1e-5, tol)  # compile first: its memory is not the layer's
        fused_check(*small, True, 1e-5, tol)
        x, y, g, b, rm, rv = case(8, 64, 65536)
        before = rss()
        r = fused_check(x, y, g, b, rm, rv, False, 1e-5, tol)
        assert r.exact_channels == 0, r.exact_channels
        y[3, 7, 100] += 1.0
        r = fused_check(x, y, g, b, rm, rv, False, 1e-5, tol)
        assert r.exact_channels == 1 and r.comparison.mismatched == 1
        assert kernels.status()["compiled_layers"] == 4, kernels.status()
        print(rss() - before)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 48, growth_mib


@pytest.mark.parametrize("layout", ["rows", "fold"])
def test_layers_whose_search_region_exceeds_a_block_stay_eager(compiled: None, layout: str) -> None:
    """Locating the greatest difference recomputes a plane ("rows") or a whole channel ("fold")
    in float64: beyond one eager block that would be float64 temporaries the size of the
    activation (a (8192, 1, 1024) layer peaked at ~10x its size), so the eager "split" layout
    checks such layers."""
    block = fused.block_elems(torch.device("cpu"))
    shape = (1, 1, block + 1) if layout == "rows" else (block // 1024 + 1, 1, 1024)
    assert kernels.layout(shape[2]) == layout
    x = torch.randn(shape)
    y = F.batch_norm(x, None, None, training=True)
    assert not kernels.eligible(x, y)
    one, zero = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    res = fused_check(x, y, one, zero, None, None, True, 1e-5, make_tolerance(None, None))
    assert res is not None and res.comparison.mismatched == 0
    assert used() == 0 and kernels.status()["checked_elements"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(4, 6, 16, 16), (4, 6, 7, 7), (64, 32)])
@pytest.mark.parametrize("train", [True, False])
def test_compiled_kernel_on_cuda_equals_reference(
    compiled: None, shape: tuple[int, ...], train: bool
) -> None:
    """On a GPU the kernels are Triton's: same verdict as the reference path there."""
    case = make_case(shape, torch.float32, train, 11)
    y = case["y"]
    assert isinstance(y, torch.Tensor)
    y.view(-1)[5] += 0.01
    case = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    fast = assert_same(case, make_tolerance(None, None))
    assert fast.comparison.mismatched >= 1
    assert used() == 1, kernels.status()


def test_cli_keeps_the_compile_cache_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bn_diff.kernels_env import private_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    private_cache()
    path = tmp_path / "bn-diff" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert path.stat().st_mode & 0o777 == 0o700
    # a directory others can write is not used
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    path.chmod(0o777)
    private_cache()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # the user's own choice wins
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    private_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"


def test_no_kernel_when_compiling_is_forced_off(compiled: None) -> None:
    """A model with a torch.compile'd submodule runs eagerly under Capture (stance "force_eager");
    the kernel would then run eagerly too, on whole float64 tensors: the eager pass checks instead."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    net[0] = torch.compile(net[0])  # type: ignore[assignment]
    report = bn_diff.run(net, torch.randn(2, 3, 14, 14), kernel="compiled")
    assert bool(report) and used() == 0
    with torch.compiler.set_stance("force_eager"):
        assert_same(make_case((2, 3, 12, 12), torch.float32, False, 3), make_tolerance(None, None))
    assert used() == 0


def test_no_kernel_when_dynamo_is_disabled(compiled: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        assert_same(make_case((2, 3, 12, 12), torch.float32, True, 4), make_tolerance(None, None))
    assert used() == 0


def test_a_suppressed_compile_error_still_falls_back_cleanly(
    dynamo_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dynamo's suppress_errors on, a failing compile would run the kernel's source eagerly
    (whole float64 tensors); bn-diff turns it off for its own calls, so the failure is seen."""
    import torch._dynamo

    def bad_backend(*a: object, **k: object) -> object:
        raise RuntimeError("backend exploded")

    real = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, **k: real(fn, backend=bad_backend, dynamic=True, fullgraph=True),
    )
    kernels._compiled.clear()
    try:
        with torch._dynamo.config.patch(suppress_errors=True):
            case = make_case((2, 3, 12, 12), torch.float32, False, 5)
            assert_same(case, make_tolerance(None, None))
        failure = str(kernels.status()["failure"])
        assert used() == 0 and "BackendCompilerFailed" in failure and "backend exploded" in failure
    finally:
        kernels._compiled.clear()


def test_the_eager_policy_never_imports_dynamo() -> None:
    """Deciding not to compile must not import torch._dynamo (importing it from the hooks of a
    CUDA forward raised the run's peak CUDA memory from 1.28x to 1.99x on an H200)."""
    script = textwrap.dedent(
        """
        import sys, torch
        import bn_diff
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        for kernel in ("eager", "auto", None):
            assert bn_diff.run(net, torch.randn(2, 3, 64, 64), kernel=kernel)
        print(sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", kernels.ENV: "auto"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def poorly_pivoted_case(train: bool, side: int = 16) -> dict[str, object]:
    """Values at the positions fused._pivot samples sit far from the rest (0 among 1000 ± 0.1):
    every channel is summed a second time, around its mean. Planes of side² values: 16 gives
    the kernels' "fold" layout, 64 "rows"."""
    case = make_case((8, 2, side, side), torch.float32, train, 5, 1000.0, 0.1)
    x = case["x"]
    assert isinstance(x, torch.Tensor)
    x = x.clone()
    x.view(8, 2, side * side)[::2, :, :: side * side // 8] = 0.0
    f32 = torch.float32
    rm, rv, g, b = (case[k] for k in ("rm", "rv", "gamma", "beta"))
    assert isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor)
    assert isinstance(g, torch.Tensor) and isinstance(b, torch.Tensor)
    case["x"] = x
    case["y"] = F.batch_norm(x, rm.to(f32), rv.to(f32), g.to(f32), b.to(f32), train, 0.0, 1e-5)
    return case


@pytest.mark.parametrize("train", [False, True])
def test_a_redo_pass_keeps_the_layout_of_the_first(
    train: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "auto" crossing its threshold between a layer's first pass (eager, "rows") and the redo
    of its poorly pivoted channels: the redo stays eager. Before, it went compiled ("fold", one
    slot) and the splice broadcast it over every sample: batch variances 8x too large."""
    monkeypatch.setattr(kernels, "AUTO_ELEMS", 8 * 2 * 256 + 1)
    kernels.set_policy("auto")
    kernels.reset()
    try:
        fast = assert_same(poorly_pivoted_case(train), make_tolerance(None, None))
        assert used() == 0 and fast.exact_channels == 0
    finally:
        kernels.set_policy(None)
        kernels.reset()


@pytest.mark.parametrize("side", [16, 64])
@pytest.mark.parametrize("train", [False, True])
def test_a_compiled_layer_is_redone_whole_by_the_kernel(
    compiled: None, train: bool, side: int
) -> None:
    fast = assert_same(poorly_pivoted_case(train, side), make_tolerance(None, None))
    assert used() == 2 and fast.exact_channels == 0  # both passes compiled, same shapes


@pytest.mark.parametrize("side", [16, 64])
@pytest.mark.parametrize("train", [False, True])
def test_a_kernel_failing_at_the_redo_hands_the_whole_layer_to_the_eager_pass(
    compiled: None, train: bool, side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = kernels.call
    calls: list[str] = []
    # kernel calls per pass: train mode in "rows" sums x first, then takes the residuals
    per_pass = 2 if train and side * side >= kernels.MIN_PLANE else 1

    def flaky(lay: str, name: str, *args: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        calls.append(name)
        if len(calls) > per_pass:  # the redo's first call fails
            kernels._state.failure = "RuntimeError: gone"
            return None
        return real(lay, name, *args)

    monkeypatch.setattr(kernels, "call", flaky)
    fast = assert_same(poorly_pivoted_case(train, side), make_tolerance(None, None))
    assert used() == 1 and fast.exact_channels == 0
    assert calls[0] == ("full" if not train else "sums" if per_pass == 2 else "train")


def test_an_invalid_environment_policy_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import cli

    from bn_diff.errors import UsageError

    monkeypatch.setenv(kernels.ENV, "fastest")
    kernels.set_policy(None)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with pytest.raises(UsageError, match="BN_DIFF_KERNEL must be auto, compiled, eager"):
        bn_diff.run(net, torch.randn(2, 3, 8, 8))
    assert bn_diff.run(net, torch.randn(2, 3, 8, 8), kernel="eager")  # an explicit choice wins
    res = cli("run", "--input-shape", "1,3,8,8", "--kernel", "fastest", "model.pt")
    assert res.code == 2 and "fastest" in res.err


def test_a_scoped_policy_is_per_thread() -> None:
    """run(kernel=...) in one thread neither shows in nor outlives another thread's run."""
    import threading

    seen: dict[str, str] = {}
    inside = threading.Event()
    done = threading.Event()

    def other() -> None:
        with kernels.using("compiled"):
            seen["other"] = kernels.policy()
            inside.set()
            done.wait(5)

    t = threading.Thread(target=other)
    with kernels.using("eager"):
        t.start()
        inside.wait(5)
        seen["main"] = kernels.policy()
        done.set()
        t.join(5)
    assert seen == {"other": "compiled", "main": "eager"}
    assert kernels.policy() == "auto" or kernels.policy() == kernels.env_policy()


def test_kernel_calls_leave_dynamo_config_as_found(dynamo_path: None) -> None:
    """The kernels' dynamo settings (one reused patch object per thread) apply during a call
    only, also when calls come from several threads."""
    import threading

    import torch._dynamo

    cfg = torch._dynamo.config
    before = (cfg.recompile_limit, cfg.fail_on_recompile_limit_hit, cfg.suppress_errors)
    seen: list[tuple[object, ...]] = []
    real = kernels._kernel

    def spy(key: tuple[str, str]) -> object:
        fn = real(key)

        def during(*args: torch.Tensor) -> object:
            seen.append((cfg.recompile_limit, cfg.fail_on_recompile_limit_hit, cfg.suppress_errors))
            return fn(*args)

        return during

    x = torch.randn(2, 3, 4)
    p = torch.zeros(3, 1, dtype=F64)

    def work() -> None:
        for _ in range(3):
            assert kernels.call("fold", "full", x, x, p, p + 1, p) is not None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_kernel", spy)
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        work()
        for t in threads:
            t.join()
    assert len(seen) == 9 and set(seen) == {(64, True, False)}
    assert (cfg.recompile_limit, cfg.fail_on_recompile_limit_hit, cfg.suppress_errors) == before
