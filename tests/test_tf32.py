"""The run-wide TF32 note: on CUDA, `run` says whether cuDNN may use TF32 for convolutions."""

from __future__ import annotations

import pytest
import torch

import bn_diff
from bn_diff import pipeline
from bn_diff.device import device_type, tf32_finding


def test_no_note_off_cuda() -> None:
    assert tf32_finding("cpu", True) is None
    assert tf32_finding("mps", False) is None


def test_note_says_enabled_or_disabled() -> None:
    on = tf32_finding("cuda", True)
    off = tf32_finding("cuda", False)
    assert on is not None and off is not None
    assert (on.id, on.severity, off.id, off.severity) == ("tf32_convolutions", "info") * 2
    assert "enabled" in on.message and "allow_tf32 = False" in on.fix
    assert "disabled" in off.message and off.fix == ""


def test_device_type_prefers_cuda() -> None:
    assert device_type([]) == "cpu"
    assert device_type([torch.zeros(1)]) == "cpu"
    assert device_type([torch.zeros(1, device="meta")]) == "meta"


@pytest.mark.parametrize("flag", [True, False])
def test_run_adds_the_note_when_on_cuda(monkeypatch: pytest.MonkeyPatch, flag: bool) -> None:
    """The CUDA branch of `run`, exercised on CPU: the device is reported as cuda."""
    monkeypatch.setattr(pipeline, "run_device", lambda model, inp: "cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", flag)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    report = bn_diff.run(net, torch.randn(2, 3, 6, 6))
    notes = [f for f in report.findings if f.id == "tf32_convolutions"]
    assert len(notes) == 1 and ("enabled" if flag else "disabled") in notes[0].message
    assert bool(report)  # an info finding does not fail the run
    assert any(f["id"] == "tf32_convolutions" for f in report.to_json()["findings"])


def test_run_on_cpu_has_no_note() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    report = bn_diff.run(net, torch.randn(2, 3, 6, 6))
    assert not [f for f in report.findings if f.id == "tf32_convolutions"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_on_cuda_has_the_note() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)).eval().cuda()
    report = bn_diff.run(net, torch.randn(2, 3, 6, 6, device="cuda"))
    assert [f.id for f in report.findings].count("tf32_convolutions") == 1
    assert bool(report)
