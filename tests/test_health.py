"""Health findings: each injected fault triggers exactly its finding; healthy models none."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_diff.health import CATALOG, HealthCheck
from bn_diff.pipeline import run
from bn_diff.results import RunReport

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402

SHAPE = (4, 3, 8, 8)


def ids(report: RunReport) -> set[str]:
    return {f.id for f in report.all_findings}


def by_id(report: RunReport, id_: str) -> list:  # type: ignore[type-arg]
    return [f for f in report.all_findings if f.id == id_]


def data(seed: int = 5, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """Same distribution as models.calibrate's batches."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.2


def conv_bn(bias: bool = False, **bn_kwargs: object) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4, **bn_kwargs))


def calibrated(**bn_kwargs: object) -> nn.Sequential:
    return models.calibrate(conv_bn(**bn_kwargs), (16, 3, 8, 8), batches=20)


def bn(net: nn.Module) -> nn.BatchNorm2d:
    m = net[1]  # type: ignore[index]
    assert isinstance(m, nn.BatchNorm2d)
    return m


def with_buffer(index: int, rv: float | None = None, rm: float | None = None) -> nn.Module:
    net = calibrated()
    with torch.no_grad():
        if rv is not None:
            bn(net).running_var[index] = rv
        if rm is not None:
            bn(net).running_mean[index] = rm
    return net


# --- the catalog is the documentation -----------------------------------------------------------
def test_catalog_ids_are_unique_and_cover_the_issue() -> None:
    got = [k.id for k in CATALOG]
    assert len(got) == len(set(got))
    assert set(got) == {
        "frozen_bn_updates_stats",
        "train_mode_layer",
        "untrained_running_stats",
        "nonfinite_stats",
        "nonpositive_running_var",
        "tiny_running_var",
        "dead_channel",
        "redundant_conv_bias",
        "no_running_stats",
        "stats_shift",
        "fp16_overflow_risk",
        "momentum_none",
    }


# --- healthy models: nothing --------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory",
    [
        models.small_cnn,
        lambda: models.ResNetStyle(blocks=(1, 1, 1, 1), width=8, num_classes=10).eval(),
        models.mlp_bn1d,
    ],
    ids=["small_cnn", "resnet_style", "mlp_bn1d"],
)
def test_healthy_calibrated_models_have_no_findings(factory: Callable[[], nn.Module]) -> None:
    net = factory()
    shape: tuple[int, ...] = (8, 20) if isinstance(net, nn.Sequential) else (4, 3, 32, 32)
    models.calibrate(net, (16,) + shape[1:])
    for seed in range(3):
        report = run(net, data(seed, shape))
        assert report.all_findings == (), [f.message for f in report.all_findings]
        assert report


def test_healthy_conv_bn_has_no_findings() -> None:
    assert ids(run(calibrated(), data())) == set()


# --- one fault, one finding ----------------------------------------------------------------------
def test_train_mode_layer_measures_batch_dependence_exactly() -> None:
    net = calibrated()
    bn(net).train()
    x = data()
    report = run(net, x)
    assert ids(report) == {"train_mode_layer"}
    (f,) = report.all_findings
    assert f.severity == "warning" and f.layer == "1"
    # brute force: this layer on sample 0 alone vs in the batch (its input held fixed)
    with torch.no_grad():
        feats = net[0](x).double()
        w, b = bn(net).weight.double(), bn(net).bias.double()
        y_batch = F.batch_norm(feats, None, None, w, b, True, 0.0, bn(net).eps)[:1]
        y_alone = F.batch_norm(feats[:1], None, None, w, b, True, 0.0, bn(net).eps)
        diff = (y_alone - y_batch).abs().amax(dim=(0, 2, 3))
    assert f.data["batch_dependence"] == pytest.approx(float(diff.max()), rel=1e-9)
    assert f.data["batch_dependence_channel"] == int(diff.argmax())
    assert "batch of 4" in f.message and "alone" in f.message
    assert bn(net).weight.requires_grad  # weights still trainable: not "frozen"


def test_train_mode_layer_is_info_when_train_mode_was_asked_for() -> None:
    report = run(calibrated(), data(), mode="train")
    assert ids(report) == {"train_mode_layer"}
    assert report.all_findings[0].severity == "info"


def test_train_mode_bn1d_compares_with_half_the_batch() -> None:
    torch.manual_seed(0)
    net = models.calibrate(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (32, 5), batches=20)
    net[1].train()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.2
    (f,) = by_id(run(net, x), "train_mode_layer")
    with torch.no_grad():
        h = net[0](x).double()
        w, b, eps = net[1].weight.double(), net[1].bias.double(), net[1].eps
        y_batch = F.batch_norm(h, None, None, w, b, True, 0.0, eps)[:1]
        y_half = F.batch_norm(h[:4], None, None, w, b, True, 0.0, eps)[:1]
    want = float((y_half - y_batch).abs().max())
    assert f.data["batch_dependence"] == pytest.approx(want, rel=1e-9)
    assert "first 4 samples" in f.message


def test_frozen_bn_updates_stats_shows_the_largest_change() -> None:
    net = calibrated()
    bn(net).train()
    bn(net).requires_grad_(False)
    x = data()
    rm0 = bn(net).running_mean.clone()
    report = run(net, x)
    # documented co-occurrence: a "frozen" layer in train mode is a train-mode layer
    assert ids(report) == {"frozen_bn_updates_stats", "train_mode_layer"}
    (f,) = by_id(report, "frozen_bn_updates_stats")
    assert f.severity == "warning"
    assert torch.equal(bn(net).running_mean, rm0)  # bn-diff restored the buffers
    with torch.no_grad():  # what the forward did to them, by PyTorch itself
        net(x)
    change = (bn(net).running_mean - rm0).abs()
    assert f.data["mean_channel"] == int(change.argmax())
    assert f.data["largest_mean_change"] == pytest.approx(float(change.max()), rel=1e-6)
    assert ".eval()" in f.fix and f"running_mean[{int(change.argmax())}]" in f.message


def test_frozen_bn_with_momentum_zero_really_is_frozen() -> None:
    net = calibrated(momentum=0.0)
    bn(net).train()
    bn(net).requires_grad_(False)
    assert ids(run(net, data())) == {"train_mode_layer"}


def test_untrained_running_stats_error_in_eval() -> None:
    report = run(conv_bn().eval(), data())
    assert ids(report) == {"untrained_running_stats"}
    assert report.all_findings[0].severity == "error"


def test_nonfinite_stats() -> None:
    report = run(with_buffer(2, rv=float("nan")), data())
    assert ids(report) == {"nonfinite_stats"}
    f = report.all_findings[0]
    assert f.severity == "error" and f.data == {"running_var": [2]}


def test_nonfinite_written_by_this_forward() -> None:
    net = calibrated()
    bn(net).train()
    x = data()
    x[0, :, 0, 0] = float("inf")
    report = run(net, x)
    assert "nonfinite_stats" in ids(report) and "nonfinite_input" in ids(report)
    (f,) = by_id(report, "nonfinite_stats")
    assert "this forward wrote" in f.message


@pytest.mark.parametrize("rv", [-0.5, 0.0])
def test_nonpositive_running_var(rv: float) -> None:
    report = run(with_buffer(1, rv=rv), data())
    assert ids(report) == {"nonpositive_running_var"}
    f = report.all_findings[0]
    assert f.severity == "error" and f.data["channels"] == [1]
    assert ("NaN" in f.message) == (rv < 0)


def test_tiny_running_var() -> None:
    report = run(with_buffer(3, rv=1e-8), data())
    assert ids(report) == {"tiny_running_var"}
    f = report.all_findings[0]
    assert f.severity == "warning"
    assert f.data["max_amplification"] == pytest.approx(1 / (1e-8 + 1e-5) ** 0.5, rel=1e-5)


def test_dead_channel_and_all_dead() -> None:
    net = calibrated()
    with torch.no_grad():
        bn(net).weight[0] = 0.0
    report = run(net, data())
    assert ids(report) == {"dead_channel"}
    assert report.all_findings[0].severity == "info"
    with torch.no_grad():
        bn(net).weight.zero_()
    (f,) = run(net, data()).all_findings
    assert f.id == "dead_channel" and f.severity == "warning" and "every channel" in f.message


def test_redundant_conv_bias() -> None:
    net = models.calibrate(conv_bn(bias=True), (16, 3, 8, 8), batches=20)
    report = run(net, data())
    assert ids(report) == {"redundant_conv_bias"}
    assert report.all_findings[0].data == {"conv": "0"}


def test_no_running_stats_module_and_functional() -> None:
    report = run(conv_bn(track_running_stats=False).eval(), data())
    assert ids(report) == {"no_running_stats"}
    assert "batch_dependence" in report.all_findings[0].data

    class Functional(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(x, None, None, training=True)

    (f,) = run(Functional(), data()).all_findings
    assert f.id == "no_running_stats" and f.message.startswith("F.batch_norm is called without")


def test_track_running_stats_false_with_buffers() -> None:
    net = calibrated()
    bn(net).track_running_stats = False
    (f,) = run(net, data()).all_findings
    assert f.id == "no_running_stats" and "buffers exist" in f.message


@pytest.mark.parametrize(
    "transform", [lambda x: x + 10.0, lambda x: x * 255.0], ids=["shift", "x255"]
)
def test_stats_shift(transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    report = run(calibrated(), transform(data()))
    assert ids(report) == {"stats_shift"}
    f = report.all_findings[0]
    assert f.severity == "warning"
    assert f.data["z"] > f.data["z_threshold"] or f.data["std_ratio"] > 3


def test_stats_shift_is_info_in_train_mode() -> None:
    report = run(calibrated(), data() * 255.0, mode="train")
    assert ids(report) == {"stats_shift", "train_mode_layer"}
    assert {f.severity for f in report.all_findings} == {"info"}


def test_fp16_overflow_risk_float32_and_half_layer() -> None:
    net = with_buffer(0, rv=1e5)
    report = run(net, data())
    assert ids(report) == {"fp16_overflow_risk"}
    assert report.all_findings[0].severity == "info"
    half = nn.Sequential(net[0].half(), net[1])  # float16 activations, float32 BN statistics
    report = run(half, data().half())
    assert ids(report) == {"fp16_overflow_risk"}
    assert report.all_findings[0].severity == "warning"


def test_momentum_none() -> None:
    report = run(calibrated(momentum=None), data())
    assert ids(report) == {"momentum_none"}
    assert "cumulative average" in report.all_findings[0].message


# --- the forum case -------------------------------------------------------------------------------
def test_forum_case_frozen_and_untrained() -> None:
    net = models.forum_net()
    net[1].requires_grad_(False)  # the user's attempt to "freeze" BN
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    first = run(net, x)
    assert ids(first) == {
        "frozen_bn_updates_stats",
        "untrained_running_stats",
        "train_mode_layer",
        "redundant_conv_bias",  # forum_net's conv keeps PyTorch's default bias=True
    }
    assert by_id(first, "untrained_running_stats")[0].severity == "warning"  # train mode
    with torch.no_grad():
        net(x)  # the first real forward: now the statistics have moved
    second = run(net, x)
    assert "untrained_running_stats" not in ids(second)
    assert "frozen_bn_updates_stats" in ids(second)
    net.eval()
    assert ids(run(net, x)) == {"redundant_conv_bias"}


# --- plumbing -------------------------------------------------------------------------------------
def test_shared_layer_reports_static_findings_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3, momentum=None).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.bn(x))

    net = Twice()
    models.calibrate(net, (8, 3, 4, 4))
    report = run(net, data())
    assert [lr.name for lr in report.layers] == ["bn", "bn#2"]
    assert [f.id for f in report.all_findings] == ["momentum_none"]


def test_health_can_be_switched_off_and_called_directly() -> None:
    assert run(conv_bn().eval(), data(), health=False).all_findings == ()
    report = run(conv_bn().eval(), data(), health=False, extensions=[HealthCheck()])
    assert ids(report) == {"untrained_running_stats"}


def test_fail_on_in_the_api() -> None:
    net = calibrated()
    bn(net).train()
    assert run(net, data())  # findings alone do not fail a run
    assert not run(net, data(), fail_on="warning")
    assert run(net, data(), fail_on="error")
    assert run(net, data(), mode="train", fail_on="warning")  # info only


def test_stats_shift_warns_once_and_points_later_layers_to_the_first() -> None:
    net = models.calibrate(models.SmallCNN(), (16, 3, 32, 32), batches=20)
    report = run(net, data(shape=(4, 3, 32, 32)) * 255.0)
    shifts = by_id(report, "stats_shift")
    assert [f.layer for f in shifts] == ["bn1", "bn2", "bn3"]
    assert [f.severity for f in shifts] == ["warning", "info", "info"]
    assert all("already shows at bn1" in f.message for f in shifts[1:])


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's shape (no torchvision here): buffers only."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, fill in (
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ):
            self.register_buffer(name, torch.full((n,), fill))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_frozen_batchnorm_module_untrained_then_loaded() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), FrozenBatchNorm2d(4)).eval()
    report = run(net, data())
    assert [lr.info.type for lr in report.layers] == ["FrozenBatchNorm2d"]
    assert ids(report) == {"untrained_running_stats"}  # no num_batches_tracked: rm ≡ 0, rv ≡ 1
    ref = calibrated()
    with torch.no_grad():
        net[0].weight.copy_(ref[0].weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(net[1], name).copy_(getattr(bn(ref), name))
    assert ids(run(net, data())) == set()


def test_findings_stay_hashable_and_json_safe() -> None:
    report = run(with_buffer(2, rv=float("nan")), data())
    (f,) = report.all_findings
    assert f in {f}
    doc = report.to_json()
    assert doc["layers"][0]["findings"] == [f.to_json()]
    assert f.to_json()["data"] == {"running_var": [2]}
