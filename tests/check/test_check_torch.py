"""`check` on torch.export programs and TorchScript modules."""

from __future__ import annotations

import copy

import pytest
import torch
from check_helpers import Exports, quiet

import bn_diff
from bn_diff.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in torch 2.13


@pytest.mark.parametrize("arch", ["resnet_tiny", "mobilenet_tiny"])
def test_pt2_archive_passes_against_eager_and_on_its_own(exports: Exports, arch: str) -> None:
    path = exports.path(arch, "pt2")
    model = exports.model(arch)
    against = bn_diff.check(path, exports.x, against=model, trust=True)
    assert against, against.to_json()
    assert sorted(lr.name for lr in against.layers) == sorted(exports.bn_names(arch))
    assert {lr.extra["exported_as"] for lr in against.layers} == {"bn"}
    assert all(lr.extra["export_mode"] == "eval" for lr in against.layers)
    assert bn_diff.check(path, exports.x, trust=True)


def test_pt2_needs_trust(exports: Exports) -> None:
    with pytest.raises(InputError, match="torch.export.load can run code"):
        bn_diff.check(exports.path("resnet_tiny", "pt2"), exports.x)


def test_decomposed_program_uses_no_training_op(exports: Exports) -> None:
    model = exports.model("resnet_tiny")
    ep = quiet(lambda: torch.export.export(model, (exports.x,))).run_decompositions()
    report = bn_diff.check(ep, exports.x, against=model)
    assert report
    assert {lr.info.type for lr in report.layers} == {"BatchNorm2d"}
    assert {lr.extra["exported_node"].rstrip("_0123456789") for lr in report.layers} == {
        "_native_batch_norm_legit_no_training"
    }


def test_eps_changed_before_torch_export_fails_at_that_layer(exports: Exports) -> None:
    model = exports.model("mobilenet_tiny")
    other = copy.deepcopy(model)
    other.features[2].conv[1][1].eps = 1e-3
    ep = quiet(lambda: torch.export.export(other, (exports.x,)))
    report = bn_diff.check(ep, exports.x, against=model)
    assert [lr.name for lr in report.failed_layers] == ["features.2.conv.1.1"]
    assert {f.id for f in report.failed_layers[0].findings} >= {"eps_mismatch"}


def test_train_mode_program_is_an_error_and_leaves_buffers_alone(exports: Exports) -> None:
    model = copy.deepcopy(exports.model("resnet_tiny")).train()
    ep = quiet(lambda: torch.export.export(model, (exports.x,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = bn_diff.check(ep, exports.x)
    assert not report
    assert {f.id for f in report.all_findings} == {"export_train_mode"}
    assert all(lr.mismatched == 0 for lr in report.layers)  # batch statistics, recomputed exactly
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the program shares them


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_passes_with_names_from_getattr_chains(exports: Exports, how: str) -> None:
    model = exports.model("resnet_tiny")
    sm = torch.jit.script(model) if how == "script" else torch.jit.trace(model, (exports.x,))
    report = bn_diff.check(sm, exports.x, against=model)
    assert report, report.to_json()
    assert sorted(lr.name for lr in report.layers) == sorted(exports.bn_names("resnet_tiny"))


def test_torchscript_archive_needs_trust(exports: Exports) -> None:
    path = exports.path("mobilenet_tiny", "script")
    with pytest.raises(InputError, match="TorchScript archive"):
        bn_diff.check(path, exports.x)
    assert bn_diff.check(path, exports.x, against=exports.model("mobilenet_tiny"), trust=True)


def test_frozen_torchscript_says_which_checks_were_skipped(exports: Exports) -> None:
    model = exports.model("mobilenet_tiny")
    frozen = torch.jit.freeze(torch.jit.script(model))
    report = bn_diff.check(frozen, exports.x, against=model)
    assert not report
    assert "torchscript_no_bn" in {f.id for f in report.findings}
    assert report.count("missing") == len(exports.bn_names("mobilenet_tiny"))
    assert all(report.outputs)  # the final outputs were still compared
