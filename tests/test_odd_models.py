"""Odd but legal models: every BN call checked, named as the user knows it, model left as found.

Each entry of ODD_MODELS builds a model and its input; `test_odd_model` runs `bn_diff.run` on it
and requires (a) every BN call agrees with the float64 recompute, (b) the expected layer names,
(c) the model bit-identical afterwards (state_dict, flags, hooks: hardening_support.fingerprint),
and (d) the entry's own check. Failure paths (a forward that raises, unsupported model kinds)
follow below it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hardening_support import fingerprint
from torch import nn

import bn_diff
from bn_diff.errors import ModelError


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_seed()) * 1.5 + 0.3


def _calibrated(m: nn.Module, x: torch.Tensor) -> nn.Module:
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval()


class SharedBN(nn.Module):
    """One BN module applied twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.bn(self.conv(x))))


class KeywordBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(input=x)  # type: ignore[no-any-return]


class Mixed(nn.Module):
    """A float32 stage, then a float16 stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv16 = nn.Conv2d(4, 4, 1).half()
        self.bn16 = nn.BatchNorm2d(4).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn16(self.conv16(self.bn(self.conv(x)).half()))


class ClampsWeight(nn.Module):
    """A forward that writes a parameter in place (weight clipping)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv.weight.mul_(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.conv.weight.clamp_(-0.05, 0.05)
        return self.bn(self.conv(x))


@dataclass
class Odd:
    id: str
    build: Callable[[], tuple[nn.Module, Any]]
    names: list[str]
    mode: str = "as-is"
    check: Callable[[nn.Module, Any, bn_diff.RunReport], None] | None = None
    findings: list[str] = field(default_factory=list)


def _hooked() -> tuple[nn.Module, Any]:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    m.calls = []  # type: ignore[assignment]
    bn = m[1]
    bn.register_forward_pre_hook(lambda mod, a: m.calls.append("pre"))  # type: ignore[operator]
    bn.register_forward_hook(lambda mod, a, o: m.calls.append("post"))  # type: ignore[operator]
    bn.register_forward_hook(lambda mod, a, k, o: m.calls.append("kw"), with_kwargs=True)  # type: ignore[operator]
    bn.register_forward_hook(lambda mod, a, o: m.calls.append("always"), always_call=True)  # type: ignore[operator]
    m[0].register_forward_pre_hook(lambda mod, a: m.calls.append("conv-pre"))  # type: ignore[operator]
    return m, _x(2, 3, 6, 6)


def _calls_once(m: nn.Module, _x: Any, _r: bn_diff.RunReport) -> None:
    assert sorted(m.calls) == ["always", "conv-pre", "kw", "post", "pre"]  # type: ignore[arg-type]


def _replacing_hook() -> tuple[nn.Module, Any]:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    m.seen = []  # type: ignore[assignment]

    def double(mod: nn.Module, a: Any, o: torch.Tensor) -> torch.Tensor:
        m.seen.append(1)  # type: ignore[operator]
        return o * 2

    m[1].register_forward_hook(double)
    return m, _x(2, 3, 6, 6)


def _hook_ran(m: nn.Module, _x: Any, _r: bn_diff.RunReport) -> None:
    assert m.seen == [1]  # type: ignore[comparison-overlap]


def _compiled() -> tuple[nn.Module, Any]:
    m = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), _x(4, 3, 6, 6))
    return torch.compile(m), _x(2, 3, 6, 6)  # type: ignore[return-value]


class WithCompiledPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.compile(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.stem(x))  # type: ignore[no-any-return]


def _deep() -> tuple[nn.Module, Any]:
    inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    m = nn.Sequential(
        nn.Sequential(nn.Sequential(nn.Sequential(inner))), nn.Sequential(nn.BatchNorm2d(4))
    )
    return m, _x(2, 3, 5, 5)


def _empty_unchanged(m: nn.Module, _x: Any, r: bn_diff.RunReport) -> None:
    assert all(lr.numel == 0 for lr in r.layers)
    assert all(lr.running_update is None or lr.running_update.ok for lr in r.layers)


def _param_restored(m: nn.Module, _x: Any, r: bn_diff.RunReport) -> None:
    assert float(m.conv.weight.detach().abs().max()) > 0.05  # type: ignore[union-attr,operator]


ODD_MODELS = [
    Odd("shared-bn-train", lambda: (SharedBN(), _x(2, 3, 5, 5)), ["bn", "bn#2"]),
    Odd(
        "shared-bn-eval",
        lambda: (_calibrated(SharedBN(), _x(4, 3, 5, 5)), _x(2, 3, 5, 5)),
        ["bn", "bn#2"],
    ),
    Odd("user-hooks-kept-and-called", _hooked, ["1"], check=_calls_once),
    Odd("user-hook-replaces-bn-output", _replacing_hook, ["1"], check=_hook_ran),
    Odd("bn-called-with-keyword-input", lambda: (KeywordBN(), _x(2, 3, 4, 4)), ["bn"]),
    Odd("torch-compile", _compiled, ["1"], findings=["compiled_module"]),
    Odd(
        "torch-compile-submodule",
        lambda: (WithCompiledPart(), _x(2, 3, 6, 6)),
        ["stem.1", "bn"],
        findings=["compiled_module"],
    ),
    Odd(
        "dataparallel",
        lambda: (
            nn.DataParallel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))),
            _x(2, 3, 6, 6),
        ),
        ["1"],
    ),
    Odd(
        "channels-last",
        lambda: (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(
                memory_format=torch.channels_last
            ),
            _x(2, 3, 6, 6).to(memory_format=torch.channels_last),
        ),
        ["1"],
    ),
    Odd(
        "non-contiguous-input",
        lambda: (nn.Sequential(nn.BatchNorm2d(4)), _x(2, 9, 5, 4)[:, ::2].permute(0, 3, 1, 2)),
        ["0"],
    ),
    Odd("float16-and-float32-layers", lambda: (Mixed(), _x(2, 3, 6, 6)), ["bn", "bn16"]),
    Odd(
        "float16-and-float32-layers-eval",
        lambda: (_calibrated(Mixed(), _x(4, 3, 6, 6)), _x(2, 3, 6, 6)),
        ["bn", "bn16"],
    ),
    Odd("nested-sequential-4-deep", _deep, ["0.0.0.0.1", "1.0"]),
    Odd("bn1d-NC", lambda: (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), _x(5, 3)), ["1"]),
    Odd(
        "bn1d-NCL",
        lambda: (nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)), _x(5, 3, 7)),
        ["1"],
    ),
    Odd(
        "zero-batch-2d-train",
        lambda: (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.zeros(0, 3, 5, 5)),
        ["1"],
        check=_empty_unchanged,
        findings=["empty_batch"],
    ),
    Odd(
        "zero-batch-2d-eval",
        lambda: (
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval(),
            torch.zeros(0, 3, 5, 5),
        ),
        ["1"],
        check=_empty_unchanged,
        findings=["empty_batch"],
    ),
    Odd(
        "zero-batch-1d-train",
        lambda: (nn.Sequential(nn.BatchNorm1d(4)), torch.zeros(0, 4)),
        ["0"],
        check=_empty_unchanged,
        findings=["empty_batch"],
    ),
    Odd(
        "cumulative-momentum-none",
        lambda: (nn.Sequential(nn.BatchNorm2d(3, momentum=None)), _x(4, 3, 4, 4)),
        ["0"],
    ),
    Odd(
        "no-affine-no-tracking",
        lambda: (
            nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False)),
            _x(4, 3, 4, 4),
        ),
        ["0"],
    ),
    Odd(
        "eval-model-checked-in-train-mode",
        lambda: (
            _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), _x(4, 3, 6, 6)),
            _x(2, 3, 6, 6),
        ),
        ["1"],
        mode="train",
    ),
    Odd(
        "forward-writes-a-parameter",
        lambda: (ClampsWeight(), _x(2, 3, 6, 6)),
        ["bn"],
        check=_param_restored,
    ),
]


@pytest.mark.parametrize("odd", ODD_MODELS, ids=[o.id for o in ODD_MODELS])
def test_odd_model(odd: Odd) -> None:
    model, x = odd.build()
    before = fingerprint(model)
    report = bn_diff.run(model, x, mode=odd.mode)
    assert bool(report), [
        (lr.info.name, lr.max_abs_diff, lr.running_update) for lr in report.layers
    ]
    assert [lr.info.name for lr in report.layers] == odd.names
    assert fingerprint(model) == before
    ids = {f.id for f in report.all_findings}
    assert set(odd.findings) <= ids, ids
    assert "model_changed" not in ids
    if odd.check is not None:
        odd.check(model, x, report)


def test_shared_bn_each_call_has_its_own_running_update() -> None:
    """Call 2 starts from the statistics call 1 left: both updates check out separately."""
    report = bn_diff.run(SharedBN(), _x(2, 3, 5, 5))
    first, second = report.layers
    assert first.running_update is not None and first.running_update.ok
    assert second.running_update is not None and second.running_update.ok
    assert first.info.num_batches_tracked == 0 and second.info.num_batches_tracked == 1


def test_user_hook_sees_bn_output_and_model_output_still_uses_it() -> None:
    model, x = _replacing_hook()
    with torch.no_grad():
        expected = model(x)
    seen = []
    model.register_forward_hook(lambda mod, a, o: seen.append(o.clone()))
    bn_diff.run(model, x)
    assert torch.equal(seen[0], expected)  # the user's doubling hook still applied


class RaisesHalfway(nn.Module):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)
        self.exc = exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(x)  # updates running statistics in train mode, before the failure
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("k"), AssertionError("no")])
def test_forward_that_raises_halfway_restores_the_model(exc: Exception) -> None:
    model = RaisesHalfway(exc).eval()
    hook_calls: list[int] = []
    model.bn1.register_forward_hook(lambda m, a, o: hook_calls.append(1))
    before = fingerprint(model)
    with pytest.raises(ModelError, match="forward failed"):
        bn_diff.run(model, _x(2, 3, 4, 4), mode="train")
    assert fingerprint(model) == before
    assert hook_calls == [1]


def test_user_pre_hook_that_raises_leaves_capture_consistent() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    state = {"fail": True}

    def maybe_fail(m: nn.Module, a: Any) -> None:
        if state["fail"]:
            raise ValueError("user hook says no")

    model[0].register_forward_pre_hook(maybe_fail)
    before = fingerprint(model)
    with pytest.raises(ModelError):
        bn_diff.run(model, _x(2, 3, 4, 4))
    assert fingerprint(model) == before
    state["fail"] = False
    report = bn_diff.run(model, _x(2, 3, 4, 4))  # the next run is unaffected
    assert bool(report) and [lr.info.name for lr in report.layers] == ["0", "1"]


def test_uninitialized_lazy_bn_refused_and_left_uninitialized() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ModelError, match="lazy"):
        bn_diff.run(model, _x(2, 3, 4, 4))
    assert isinstance(model[1].weight, nn.parameter.UninitializedParameter)


def test_torchscript_module_refused() -> None:
    model = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(ModelError, match="TorchScript"):
        bn_diff.run(model, _x(2, 3, 4, 4))


@pytest.mark.parametrize("how", ["add_", "setitem", "out=", "copy_", "nn.init", ".data"])
def test_in_place_parameter_writes_are_undone(how: str) -> None:
    class Writer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.bn.weight
            with torch.no_grad():
                if how == "add_":
                    w.add_(1.0)
                elif how == "setitem":
                    w[0] = 3.0
                elif how == "out=":
                    torch.add(w.detach(), 1.0, out=w.detach())
                elif how == "copy_":
                    w.copy_(torch.full((3,), 5.0))
                elif how == "nn.init":
                    nn.init.normal_(w)
                else:
                    w.data.mul_(4.0)
            return self.bn(x)  # type: ignore[no-any-return]

    model = Writer()
    before = fingerprint(model)
    report = bn_diff.run(model, _x(2, 3, 4, 4))
    assert bool(report) and "model_changed" not in {f.id for f in report.findings}
    assert fingerprint(model) == before


def test_parameter_written_behind_the_guard_is_reported_not_hidden() -> None:
    """`torch.ops.aten` calls bypass the capture's TorchFunctionMode: bn-diff cannot undo the
    write, and says so in a warning instead of claiming the model is untouched."""

    class OpsWriter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.ops.aten.add_.Tensor(self.bn.weight.detach(), 1.0)
            return self.bn(x)  # type: ignore[no-any-return]

    report = bn_diff.run(OpsWriter(), _x(2, 3, 4, 4))
    changed = [f for f in report.findings if f.id == "model_changed"]
    assert changed and "bn.weight" in changed[0].message
