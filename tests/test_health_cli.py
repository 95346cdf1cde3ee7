"""Health findings through the real CLI: console, --json, --fail-on exit codes, --html."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from bn_diff.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


@pytest.fixture(autouse=True)
def plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "100")


def names(net: torch.nn.Module) -> tuple[str, str]:
    """(conv, bn) qualified names of a two-layer model (examples/ may name them or not)."""
    conv = next(n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d))
    bn = next(n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    return conv, bn


FORUM_CONV, FORUM_BN = names(models.forum_net())


@pytest.fixture
def forum(tmp_path: Path) -> tuple[Path, Path]:
    """The forum model with its BN "frozen" by requires_grad=False, never run: all warnings."""
    net = models.forum_net()
    net[1].requires_grad_(False)
    torch.save(net, tmp_path / "forum.pt")
    torch.save(
        torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), tmp_path / "x.pt"
    )
    return tmp_path / "forum.pt", tmp_path / "x.pt"


@pytest.fixture
def untrained_eval(tmp_path: Path) -> tuple[Path, Path]:
    """The forum model in eval mode before any training: an error finding."""
    torch.save(models.forum_net().eval(), tmp_path / "fresh.pt")
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "x.pt")
    return tmp_path / "fresh.pt", tmp_path / "x.pt"


@pytest.fixture
def healthy(tmp_path: Path) -> list[str]:
    cnn = models.calibrate(models.SmallCNN(), (16, 3, 32, 32), batches=20)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    torch.save(torch.randn(4, 3, 32, 32) * 1.5 + 0.2, tmp_path / "x.pt")
    examples = str(Path(__file__).resolve().parents[1] / "examples")
    return [
        str(tmp_path / "cnn.pt"),
        str(tmp_path / "x.pt"),
        "--arch",
        "models:small_cnn",
        "--pythonpath",
        examples,
    ]


def test_console_lists_findings_and_counts_them(
    forum: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(["run", str(forum[0]), str(forum[1]), "--trust"], capsys)
    assert code == 0  # findings alone do not fail a run
    for id_ in (
        "frozen_bn_updates_stats",
        "untrained_running_stats",
        "train_mode_layer",
        "redundant_conv_bias",
    ):
        assert re.search(rf"^(warning|info) +{id_} \[{re.escape(FORUM_BN)}\]: ", out, re.M), id_
    assert "fix: requires_grad=False freezes only weight and bias" in out
    assert "4 findings: 3 warnings, 1 info (listed above)." in out


@pytest.mark.parametrize(
    ("fixture", "fail_on", "code"),
    [
        ("forum", None, 0),
        ("forum", "warning", 1),
        ("forum", "error", 0),
        ("untrained_eval", "error", 1),
        ("untrained_eval", "warning", 1),
    ],
)
def test_fail_on_exit_codes(
    fixture: str,
    fail_on: str | None,
    code: int,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, x = request.getfixturevalue(fixture)
    args = ["run", str(model), str(x), "--trust"] + (["--fail-on", fail_on] if fail_on else [])
    got, out, _ = cli(args, capsys)
    assert got == code
    assert ("at or above --fail-on" in out) == (code == 1)


def test_healthy_model_passes_fail_on_warning(
    healthy: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(["run", *healthy, "--fail-on", "warning"], capsys)
    assert code == 0, out
    assert "finding" not in out


def test_json_has_findings_per_layer(
    forum: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(
        ["run", str(forum[0]), str(forum[1]), "--trust", "--json", "-", "--fail-on", "warning"],
        capsys,
    )
    assert code == 1
    doc = json.loads(out)  # stdout is clean JSON
    assert doc["ok"] is False
    (layer,) = doc["layers"]
    by_id = {f["id"]: f for f in layer["findings"]}
    assert set(by_id) == {
        "frozen_bn_updates_stats",
        "untrained_running_stats",
        "train_mode_layer",
        "redundant_conv_bias",
    }
    frozen = by_id["frozen_bn_updates_stats"]
    assert frozen["severity"] == "warning" and frozen["layer"] == FORUM_BN and frozen["fix"]
    assert frozen["data"]["mean_channel"] in (0, 1) and frozen["data"]["largest_mean_change"] > 0
    dep = by_id["train_mode_layer"]["data"]
    assert dep["sample"] == 0 and dep["other_batch_samples"] == 1 and dep["batch_dependence"] > 0
    assert by_id["redundant_conv_bias"]["data"] == {"conv": FORUM_CONV}


def test_html_report_is_self_contained(
    forum: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "report.html"
    code, out, _ = cli(
        ["run", str(forum[0]), str(forum[1]), "--trust", "--html", str(page)], capsys
    )
    assert code == 0 and "frozen_bn_updates_stats" in out
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count("<svg") == 3  # mean, variance, error for the one layer
    assert "frozen_bn_updates_stats" in text and "running mean" in text
    for ref in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text):
        assert ref.startswith("#"), ref  # nothing fetched: only in-page links
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert not list(tmp_path.glob(".report.html.*"))  # no temp file left behind


def test_html_to_a_missing_folder_is_a_usage_error(
    forum: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "no" / "such" / "report.html"
    code, _, err = cli(
        ["run", str(forum[0]), str(forum[1]), "--trust", "--html", str(page)], capsys
    )
    assert code == 2
    assert "cannot write" in err and "Traceback" not in err
    assert not page.exists()
