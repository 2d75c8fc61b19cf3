"""Draw grouped, stacked bar charts as PNGs without matplotlib, on examples/_png.py's canvas.

`stacked_bar_chart(path, panels, series=..., ...)` draws one panel per group (e.g. per world size),
one bar per item inside it, each bar cut into one coloured segment per series. Bars are labelled by
short codes under them (a, b, c, ...) and a key below the panels spells each code out, because
the 3x5 pixel font is small. The PNG encoding and the font come from examples/_png.py (imported,
not copied); this module only adds the glyphs that font lacks.

Must not import torch or shardoptim.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

# NOTE: examples/ is not a package; _png.py is its plain-stdlib PNG writer.
_EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
if _EXAMPLES not in sys.path:
    sys.path.append(_EXAMPLES)

import _png  # noqa: E402
from _png import BLACK, GRAY, GRID, Canvas, Color, _nice_ticks  # noqa: E402

#: One colour per series (params, grads, state, master in benchmarks/memory.py).
PALETTE: tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))

# 3x5 glyphs missing from _png's font (rows top to bottom, 3 bits each), and lowercase shapes
# for the letters it draws as capitals, so that labels read in one case.
_EXTRA_GLYPHS: dict[str, tuple[str, ...]] = {
    "e": ("000", "010", "111", "100", "011"),
    "f": ("001", "010", "111", "010", "010"),
    "l": ("110", "010", "010", "010", "111"),
    "o": ("000", "010", "101", "101", "010"),
    "p": ("000", "110", "101", "110", "100"),
    "r": ("000", "101", "110", "100", "100"),
    "s": ("000", "011", "100", "001", "110"),
    "t": ("010", "111", "010", "010", "001"),
    "a": ("000", "011", "101", "101", "011"),
    "b": ("100", "110", "101", "101", "110"),
    "c": ("000", "011", "100", "100", "011"),
    "d": ("001", "011", "101", "101", "011"),
    "g": ("000", "111", "100", "101", "111"),
    "h": ("100", "110", "101", "101", "101"),
    "i": ("010", "000", "010", "010", "010"),
    "j": ("001", "000", "001", "101", "010"),
    "k": ("100", "101", "110", "101", "101"),
    "m": ("000", "111", "111", "101", "101"),
    "n": ("000", "110", "101", "101", "101"),
    "q": ("011", "101", "011", "001", "001"),
    "u": ("000", "101", "101", "101", "011"),
    "v": ("000", "101", "101", "101", "010"),
    "w": ("000", "101", "101", "111", "111"),
    "x": ("000", "101", "010", "101", "101"),
    "y": ("101", "101", "011", "001", "110"),
    "z": ("000", "111", "001", "010", "111"),
    "A": ("010", "101", "111", "101", "101"),
    "B": ("110", "101", "110", "101", "110"),
    "D": ("110", "101", "101", "101", "110"),
    "M": ("101", "111", "101", "101", "101"),
    "N": ("101", "111", "111", "111", "101"),
    "P": ("110", "101", "110", "100", "100"),
    "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"),
    "W": ("101", "101", "111", "111", "101"),
    "Z": ("111", "001", "010", "100", "111"),
    "=": ("000", "111", "000", "111", "000"),
    "(": ("001", "010", "010", "010", "001"),
    ")": ("100", "010", "010", "010", "100"),
    "/": ("001", "001", "010", "100", "100"),
    ":": ("000", "010", "000", "010", "000"),
    ",": ("000", "000", "000", "010", "100"),
}
_GLYPHS = {**_png._FONT, **_EXTRA_GLYPHS}


class _Canvas(Canvas):
    """_png.Canvas whose text() also knows the glyphs above."""

    def text(self, x: int, y: int, text: str, color: Color = BLACK, *, scale: int = 2) -> None:
        for char in text:
            for row, bits in enumerate(_GLYPHS.get(char, ())):
                for col, bit in enumerate(bits):
                    if bit == "1":
                        self.point(x + col * scale, y + row * scale, color, thickness=scale)
            x += 4 * scale

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the rectangle [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(x0, 0), min(x1, self.width)
        row = bytes(color) * max(x1 - x0, 0)
        for y in range(max(y0, 0), min(y1, self.height)):
            start = (y * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row


def _width(text: str, scale: int = 2) -> int:
    return _png.text_width(text, scale=scale)


def stacked_bar_chart(
    path: str | os.PathLike[str],
    panels: Sequence[tuple[str, Sequence[Sequence[float]]]],
    *,
    series: Sequence[str],
    codes: Sequence[str],
    names: Sequence[str],
    y_label: str,
    bar_px: int = 26,
    height: int = 460,
) -> None:
    """Write a PNG of stacked bars, one panel per group, and return nothing.

    Args:
        path: where to write (parent directories are created; written to `<path>.tmp`, renamed).
        panels: (panel title, bars); each bar is one value per series, stacked bottom to top.
            Every panel has the same bars in the same order (a bar of all zeros is left empty).
        series: the name of each segment, in stacking order (the colour key).
        codes: a short label under each bar ("a", "b", ...), one per bar.
        names: what each code stands for, written in the key below the panels.
        y_label: the title of the shared y axis (e.g. "MiB per rank").
        bar_px: width of one bar in pixels.
        height: height of the image in pixels.
    """
    num_bars = len(codes)
    if any(len(bars) != num_bars for _, bars in panels) or len(names) != num_bars:
        raise ValueError(f"every panel needs {num_bars} bars (one per code) and one name per code")
    top_value = max((sum(bar) for _, bars in panels for bar in bars), default=1.0) or 1.0
    ticks, decimals = _nice_ticks(0.0, top_value * 1.05)
    if len(ticks) > 1 and ticks[-1] < top_value * 1.05:
        ticks.append(round(2 * ticks[-1] - ticks[-2], decimals))
    y_max = ticks[-1]
    key_rows = (num_bars + 1) // 2
    left, right, top, gap = 80, 20, 50, 40
    bottom = 50 + 16 * key_rows
    panel_w = num_bars * bar_px + (num_bars + 1) * (bar_px // 2)
    width = left + len(panels) * panel_w + (len(panels) - 1) * gap + right
    width = max(width, left + 2 * 260 + right)
    canvas = _Canvas(width, height + 16 * key_rows)
    plot_h = canvas.height - top - bottom

    def to_y(value: float) -> int:
        return top + plot_h - round(value / y_max * plot_h)

    for tick in ticks:
        py = to_y(tick)
        canvas.line(left, py, width - right, py, GRID)
        label = f"{tick:.{decimals}f}"
        canvas.text(left - 8 - _width(label), py - 5, label)
    canvas.line(left, top, left, top + plot_h, BLACK)
    canvas.line(left, top + plot_h, width - right, top + plot_h, BLACK)
    canvas.text(8, 12, y_label)
    x_key = left + 8 * _width(" ") + _width(y_label)
    for i, name in enumerate(series):
        canvas.rect(x_key, 12, x_key + 10, 22, PALETTE[i % len(PALETTE)])
        canvas.text(x_key + 14, 12, name)
        x_key += 14 + _width(name) + 20
    for p, (title, bars) in enumerate(panels):
        x_panel = left + p * (panel_w + gap)
        canvas.text(x_panel + (panel_w - _width(title)) // 2, top - 16, title)
        for b, bar in enumerate(bars):
            x0 = x_panel + bar_px // 2 + b * (bar_px + bar_px // 2)
            base = 0.0
            for s, value in enumerate(bar):
                if value > 0:
                    canvas.rect(
                        x0, to_y(base + value), x0 + bar_px, to_y(base) + 1, PALETTE[s % len(PALETTE)]
                    )
                base += value
            canvas.text(x0 + (bar_px - _width(codes[b])) // 2, top + plot_h + 8, codes[b])
        if p:
            canvas.line(x_panel - gap // 2, top, x_panel - gap // 2, top + plot_h, GRAY)
    column_w = (width - left) // 2
    for i, (code, name) in enumerate(zip(codes, names)):
        x = left + (i % 2) * column_w
        y = top + plot_h + 30 + (i // 2) * 16
        canvas.text(x, y, f"{code}: {name}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(canvas.encode())
    os.replace(tmp, target)
