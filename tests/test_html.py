"""The HTML report: page structure and SVG plots (always), and rendering in headless Chromium
(skipped with a reason where Chromium is absent; CI installs it: apt-get install -y chromium)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bn_diff.pipeline import run
from bn_diff.render.html import BATCH, RUNNING, render_html, write_html
from bn_diff.render.svg import Series, nice_ticks, plot
from bn_diff.results import RunReport

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install -y chromium), so the HTML report's "
    "rendering is not checked here",
)


def report_with_drift() -> RunReport:
    """Two BN layers: the forum case (2 channels, train mode) and a calibrated CNN whose bn2 has
    drifted running means, so batch and running statistics differ visibly."""
    cnn = models.calibrate(models.SmallCNN(), (16, 3, 32, 32), batches=20)
    with torch.no_grad():
        cnn.bn2.running_mean[4:12] += 3.0
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.2
    return run(cnn, x, model_name="cnn <drifted> & co")


# --- without a browser ----------------------------------------------------------------------------
def test_page_has_three_plots_per_layer_and_escapes_names() -> None:
    report = report_with_drift()
    page = render_html(report)
    assert page.count("<svg") == 3 * len(report.layers) == 9
    assert "cnn &lt;drifted&gt; &amp; co" in page and "<drifted>" not in page
    assert page.count('data-series="batch mean"') == 3
    assert page.count('data-series="running mean"') == 3
    assert "stats_shift" in page  # bn2's drift is a finding, listed in the page


def test_plot_survives_nan_none_zero_and_empty() -> None:
    svg = plot("t", [Series("a", [1.0, float("nan"), None, 2.0, float("inf")], BATCH)])
    assert svg.count("M") >= 2  # the line breaks at the missing values
    assert "nan" not in svg.split("<title>")[0]
    svg = plot("t", [Series("err", [0.0, 0.0], BATCH, bars=True)], log=True, note="all zero")
    assert "all zero" in svg and "<path" not in svg
    assert "no finite values" in plot("t", [Series("a", [], BATCH)])


@given(
    st.floats(-1e12, 1e12, allow_nan=False),
    st.floats(0, 1e12, allow_nan=False),
)
def test_nice_ticks_cover_the_range(lo: float, span: float) -> None:
    hi = lo + span
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-9 * max(1.0, abs(lo)) and ticks[-1] >= hi - 1e-9 * max(1.0, abs(hi))
    assert all(b > a for a, b in zip(ticks, ticks[1:], strict=False))
    assert 2 <= len(ticks) <= 52


def test_write_html_is_atomic_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    write_html(report_with_drift(), target)
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


# --- in headless Chromium ------------------------------------------------------------------------
def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


MEASURE = """<script>
const r = [...document.querySelectorAll('svg.plot')].map(svg => {
  const b = svg.getBoundingClientRect();
  return {w: b.width, h: b.height, series: [...svg.querySelectorAll('path.series')].map(p => {
    const bb = p.getBBox(); return [p.dataset.series, bb.width, bb.height]; })};
});
document.body.insertAdjacentHTML('beforeend',
  '<pre id="bn-measure">' + JSON.stringify(r) + '</pre>');
</script></body>"""


@needs_chromium
def test_chromium_lays_out_every_plot(tmp_path: Path) -> None:
    page = render_html(report_with_drift())
    # the report itself has no script; this copy adds one that measures what Chromium laid out
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", MEASURE), encoding="utf-8")
    done = chromium(["--dump-dom", probe.as_uri()], tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    m = re.search(r'<pre id="bn-measure">(\[.*?)</pre>', done.stdout, re.S)
    assert m, done.stdout[-2000:]
    plots = json.loads(html.unescape(m.group(1)))
    assert len(plots) == 9
    for p in plots:
        assert p["w"] == pytest.approx(720) and p["h"] > 150
        assert p["series"], p
        for name, w, h in p["series"]:
            assert w > 100, (name, w)  # a line or bars across the channels, not an empty path
            assert h >= 0
    mean_plots = [
        p for p in plots if [s[0] for s in p["series"]][:2] == ["batch mean", "running mean"]
    ]
    assert len(mean_plots) == 3


@needs_chromium
def test_chromium_screenshot_shows_the_plots(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    write_html(report_with_drift(), target)
    shot = tmp_path / "shot.png"
    done = chromium(
        ["--hide-scrollbars", "--window-size=900,1400", f"--screenshot={shot}", target.as_uri()],
        tmp_path / "profile",
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    width, height, pixels = decode_png(shot.read_bytes())
    assert (width, height) == (900, 1400)
    counts = colour_counts(pixels, [hex_rgb(BATCH), hex_rgb(RUNNING)])
    # legend swatches and point markers in the series colours: the SVG was rasterised
    assert counts[hex_rgb(BATCH)] > 200 and counts[hex_rgb(RUNNING)] > 200, counts
    assert len(set(pixels[::97])) > 20  # not a blank page


def hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def colour_counts(
    pixels: list[tuple[int, int, int]], colours: list[tuple[int, int, int]]
) -> dict[tuple[int, int, int], int]:
    want = set(colours)
    counts = dict.fromkeys(colours, 0)
    for p in pixels:
        if p in want:
            counts[p] += 1
    return counts


def decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """A minimal PNG decoder (8-bit RGB/RGBA, not interlaced): what Chromium's screenshots are."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
            channels = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        unfilter(ftype, line, prev, channels)
        pixels.extend(zip(line[0::channels], line[1::channels], line[2::channels], strict=False))
        prev = line
    return width, height, pixels


def unfilter(ftype: int, line: bytearray, prev: bytearray, bpp: int) -> None:
    if ftype == 0:
        return
    if ftype == 2:
        for i in range(len(line)):
            line[i] = (line[i] + prev[i]) & 0xFF
        return
    for i in range(len(line)):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if ftype == 1:
            line[i] = (line[i] + a) & 0xFF
        elif ftype == 3:
            line[i] = (line[i] + (a + b) // 2) & 0xFF
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            line[i] = (line[i] + pred) & 0xFF


def test_png_decoder_on_a_known_image() -> None:
    """The decoder the screenshot test relies on, checked on a PNG built here with every filter."""
    rows = [[(10 * x + y, 200 - x, 7 * y) for x in range(5)] for y in range(5)]
    raw = b""
    prev = bytes(15)
    for y, row in enumerate(rows):
        line = bytes(v for px in row for v in px)
        ftype = y % 5
        raw += bytes([ftype]) + filter_line(ftype, line, prev, 3)
        prev = line
    ihdr = struct.pack(">IIBBBBB", 5, 5, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
    png += chunk(b"IEND", b"")
    w, h, pixels = decode_png(png)
    assert (w, h) == (5, 5)
    assert pixels == [px for row in rows for px in row]


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def filter_line(ftype: int, line: bytes, prev: bytes, bpp: int) -> bytes:
    out = bytearray()
    for i, x in enumerate(line):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if ftype == 0:
            pred = 0
        elif ftype == 1:
            pred = a
        elif ftype == 2:
            pred = b
        elif ftype == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        out.append((x - pred) & 0xFF)
    return bytes(out)
