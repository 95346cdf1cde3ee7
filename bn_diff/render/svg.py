"""Per-channel plots as inline SVG strings: no JavaScript, no network, no plotting library.

One plot = one `<svg>` with a frame, y ticks (linear or log), x ticks (channel indices), a legend
and one `<path>` per series (bars are one path per colour), so a 2048-channel layer stays a
handful of elements. With at most `MARKERS_UP_TO` channels every point also gets a circle whose
`<title>` shows its value on hover.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

MARKERS_UP_TO = 64
WIDTH, HEIGHT = 720, 214
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 40, 30


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    values: Sequence[float | None]
    color: str
    bars: bool = False
    dash: str | None = None
    """SVG stroke-dasharray, e.g. "4 3"."""
    highlight: Sequence[bool] = ()
    """Bars drawn in `highlight_color` where True (e.g. mismatching channels)."""
    highlight_color: str = "#d62728"


def _ok(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 or not log)


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e5:
        return f"{x:.4g}"
    return f"{x:.2g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round numbers spanning [lo, hi] (the first ≤ lo, the last ≥ hi), about n steps."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    scale = max(abs(lo), abs(hi))
    if hi - lo <= max(1e-9 * scale, 1e-300):  # flat: give it some room
        pad = scale * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    k0, k1 = math.floor(lo / step), math.ceil(hi / step)
    return [k * step for k in range(k0, max(k1, k0 + 1) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    step = max(1, math.ceil((b - a) / 8))
    return [10.0**e for e in range(a, b + 1, step)] + ([10.0**b] if (b - a) % step else [])


def plot(
    title: str,
    series: Sequence[Series],
    *,
    log: bool = False,
    note: str = "",
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """An SVG line/bar plot over channel index (x = 0 … C-1) of one or more series."""
    n = max((len(s.values) for s in series), default=0)
    vals = [float(v) for s in series for v in s.values if _ok(v, log)]  # type: ignore[arg-type]
    if any(s.bars for s in series) and not log:
        vals.append(0.0)
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>',
        f'<text x="{LEFT}" y="14" class="pt">{escape(title)}</text>',
    ]
    if not vals or n == 0:
        out.append(
            f'<text x="{LEFT + pw / 2}" y="{TOP + ph / 2}" text-anchor="middle" class="pn">'
            f"{escape(note or 'no finite values to plot')}</text></svg>"
        )
        return "".join(out)
    if log:
        ticks = _log_ticks(min(vals), max(vals))
        y0, y1 = math.log10(ticks[0]), math.log10(ticks[-1])

        def ty(v: float) -> float:
            return TOP + ph - (math.log10(v) - y0) / (y1 - y0) * ph

    else:
        ticks = nice_ticks(min(vals), max(vals))
        y0, y1 = ticks[0], ticks[-1]

        def ty(v: float) -> float:
            return TOP + ph - (v - y0) / (y1 - y0) * ph

    def tx(i: int) -> float:
        return LEFT + (i + 0.5) * pw / n

    for t in ticks:
        y = ty(t)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(
            f'<text x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end" class="tk">{fmt(t)}</text>'
        )
    xstep = nice_ticks(0, max(n - 1, 1), 8)
    xstep_i = max(1, int(round(xstep[1] - xstep[0]))) if len(xstep) > 1 else 1
    for i in range(0, n, xstep_i):
        out.append(
            f'<text x="{tx(i):.1f}" y="{TOP + ph + 13}" text-anchor="middle" class="tk">{i}</text>'
        )
    out.append(
        f'<text x="{LEFT + pw / 2}" y="{height - 3}" text-anchor="middle" class="tk">channel</text>'
    )
    base = ty(ticks[0]) if log else ty(min(max(0.0, y0), y1))
    bw = max(pw / n * 0.8, 0.5)
    for s in series:
        if s.bars:
            out.extend(_bars(s, tx, ty, base, bw, log))
        else:
            out.extend(_line(s, n, tx, ty, log))
    out.extend(_legend(series))
    if note:
        out.append(
            f'<text x="{LEFT + pw - 4}" y="{TOP + 12}" text-anchor="end" class="pn">'
            f"{escape(note)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


XMap = Callable[[int], float]
YMap = Callable[[float], float]


def _line(s: Series, n: int, fx: XMap, fy: YMap, log: bool) -> list[str]:
    d: list[str] = []
    pen_up = True
    for i, v in enumerate(s.values):
        if not _ok(v, log):
            pen_up = True
            continue
        assert v is not None
        d.append(f"{'M' if pen_up else 'L'}{fx(i):.1f} {fy(v):.1f}")
        pen_up = False
    dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
    parts = [
        f'<path class="series" data-series="{escape(s.label)}" d="{" ".join(d)}" fill="none" '
        f'stroke="{s.color}" stroke-width="1.6"{dash}/>'
    ]
    if n <= MARKERS_UP_TO:
        for i, v in enumerate(s.values):
            if _ok(v, log):
                assert v is not None
                parts.append(
                    f'<circle cx="{fx(i):.1f}" cy="{fy(v):.1f}" r="2.6" fill="{s.color}">'
                    f"<title>channel {i}: {escape(s.label)} = {v:.6g}</title></circle>"
                )
    return parts


def _bars(s: Series, fx: XMap, fy: YMap, base: float, bw: float, log: bool) -> list[str]:
    normal: list[str] = []
    hot: list[str] = []
    for i, v in enumerate(s.values):
        if not _ok(v, log):
            continue
        assert v is not None
        x0 = fx(i) - bw / 2
        top = fy(v)
        seg = f"M{x0:.1f} {base:.1f}V{top:.1f}h{bw:.2f}V{base:.1f}Z"
        (hot if i < len(s.highlight) and s.highlight[i] else normal).append(seg)
    parts = []
    for segs, color, tag in ((normal, s.color, ""), (hot, s.highlight_color, "-highlight")):
        if segs:
            parts.append(
                f'<path class="series bars" data-series="{escape(s.label)}{tag}" '
                f'd="{"".join(segs)}" fill="{color}"/>'
            )
    return parts


def _legend(series: Sequence[Series]) -> list[str]:
    """One row under the title, left-aligned with the frame."""
    parts = []
    x: float = LEFT
    for s in series:
        parts.append(
            f'<rect x="{x}" y="22" width="12" height="10" fill="{s.color}"/>'
            f'<text x="{x + 16}" y="31" class="lg">{escape(s.label)}</text>'
        )
        x += 6.5 * len(s.label) + 34
    return parts
