"""Draw a line chart into a small RGB raster and write it as a PNG, with the standard library only.

No matplotlib: `zlib` compresses the scanlines and `struct` packs the chunks (signature, IHDR, IDAT,
IEND; 8-bit truecolour, no interlace). `line_chart()` draws a light grid, the axes, tick labels in a
built-in 3x5 pixel font and the curve. Used by examples/train_gpt.py for its loss curve.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)
GRAY: Color = (120, 120, 120)
BLUE: Color = (31, 119, 180)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 3x5 glyphs, one string of 3 bits per row, top row first. Enough for numbers and the axis titles.
_FONT: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    "-": ("000", "000", "111", "000", "000"),
    "+": ("000", "010", "111", "010", "000"),
    "e": ("111", "100", "111", "100", "111"),
    "s": ("011", "100", "010", "001", "110"),
    "t": ("111", "010", "010", "010", "010"),
    "p": ("111", "101", "111", "100", "100"),
    "l": ("100", "100", "100", "100", "111"),
    "o": ("010", "101", "101", "101", "010"),
    "f": ("011", "100", "111", "100", "100"),
    "r": ("000", "110", "101", "100", "100"),
    " ": ("000", "000", "000", "000", "000"),
}


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """Return the bytes of a PNG image of `width` x `height` pixels, 3 bytes (R, G, B) each, row by row."""
    if width < 1 or height < 1 or len(rgb) != width * height * 3:
        raise ValueError(
            f"need width, height >= 1 and width * height * 3 = {width * height * 3} bytes of RGB, "
            f"got {width} x {height} and {len(rgb)} bytes"
        )
    stride = width * 3
    # Each scanline starts with its filter type; 0 means "none".
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit depth, colour type 2 (RGB)
    return (
        PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )


class Canvas:
    """An RGB raster with (0, 0) at the top left; drawing outside it is clipped."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def point(self, x: int, y: int, color: Color, *, thickness: int = 1) -> None:
        """Paint a `thickness` x `thickness` square whose top-left corner is (x, y)."""
        for yy in range(y, y + thickness):
            for xx in range(x, x + thickness):
                if 0 <= xx < self.width and 0 <= yy < self.height:
                    i = (yy * self.width + xx) * 3
                    self.pixels[i : i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, *, thickness: int = 1) -> None:
        """Draw a straight line from (x0, y0) to (x1, y1), both ends included (Bresenham)."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.point(x0, y0, color, thickness=thickness)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color = BLACK, *, scale: int = 2) -> None:
        """Write `text` with its top-left corner at (x, y); characters without a glyph are skipped."""
        for char in text:
            glyph = _FONT.get(char)
            if glyph is None:
                continue
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "1":
                        self.point(x + col * scale, y + row * scale, color, thickness=scale)
            x += 4 * scale

    def encode(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels)


def text_width(text: str, *, scale: int = 2) -> int:
    """Return the width in pixels of `text` as `Canvas.text` draws it."""
    return max(len(text) * 4 * scale - scale, 0)


def _nice_ticks(low: float, high: float, *, num: int = 5) -> tuple[list[float], int]:
    """Return round tick values covering [low, high] (steps of 1, 2 or 5 x 10^k) and their decimals."""
    if not high > low:
        high = low + 1.0
    raw = (high - low) / num
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    first = math.ceil(low / step - 1e-9)
    ticks = []
    k = first
    while k * step <= high + step * 1e-9:
        ticks.append(round(k * step, decimals))
        k += 1
    return ticks, decimals


def line_chart(
    path: str | os.PathLike[str],
    ys: Sequence[float],
    *,
    x_start: int = 1,
    width: int = 640,
    height: int = 400,
    x_label: str = "step",
    y_label: str = "loss",
    color: Color = BLUE,
    reference: float | None = None,
    reference_label: str = "floor",
) -> None:
    """Plot `ys` against x = x_start, x_start + 1, ... and write the chart as a PNG to `path`.

    `reference`, if given, is drawn as a dashed horizontal line labelled `reference_label` (e.g. the
    lowest loss possible). Non-finite values are left out. The file is written to `<path>.tmp` and
    renamed, so a reader never sees half a PNG. Parent directories are created.
    """
    points = [(x_start + i, float(y)) for i, y in enumerate(ys) if math.isfinite(y)]
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, 20, 20, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    if points:
        x_lo, x_hi = points[0][0], max(points[-1][0], points[0][0] + 1)
        values = [y for _, y in points] + ([reference] if reference is not None else [])
        y_lo, y_hi = min(values), max(values)
        pad = 0.05 * (y_hi - y_lo) if y_hi > y_lo else 0.5
        y_lo, y_hi = y_lo - pad, y_hi + pad
    else:
        x_lo, x_hi, y_lo, y_hi = 0, 1, 0.0, 1.0

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = left + round((x - x_lo) / (x_hi - x_lo) * (plot_w - 1))
        py = top + round((y_hi - y) / (y_hi - y_lo) * (plot_h - 1))
        return px, py

    y_ticks, y_decimals = _nice_ticks(y_lo, y_hi)
    for tick in y_ticks:
        if not y_lo <= tick <= y_hi:
            continue
        _, py = to_px(x_lo, tick)
        canvas.line(left, py, left + plot_w - 1, py, GRID)
        label = f"{tick:.{y_decimals}f}"
        canvas.text(left - 8 - text_width(label), py - 5, label)
    x_ticks, _ = _nice_ticks(x_lo, x_hi)
    for tick in x_ticks:
        if not x_lo <= tick <= x_hi:
            continue
        px, _ = to_px(tick, y_lo)
        canvas.line(px, top, px, top + plot_h - 1, GRID)
        label = f"{int(tick)}"
        canvas.text(px - text_width(label) // 2, top + plot_h + 8, label)
    canvas.line(left, top, left, top + plot_h - 1, BLACK)  # y axis
    canvas.line(left, top + plot_h - 1, left + plot_w - 1, top + plot_h - 1, BLACK)  # x axis
    canvas.text(left + (plot_w - text_width(x_label)) // 2, height - 18, x_label)
    canvas.text(8, top - 14 if top >= 14 else 0, y_label)
    if reference is not None and points:
        _, py = to_px(x_lo, reference)
        for px in range(left + 1, left + plot_w, 8):
            canvas.line(px, py, min(px + 3, left + plot_w - 1), py, GRAY)
        label_x = left + plot_w - 4 - text_width(reference_label)
        canvas.text(label_x, py - 14 if py - 14 >= top else py + 4, reference_label, GRAY)
    previous = None
    for x, y in points:
        current = to_px(x, y)
        if previous is None:
            canvas.point(current[0], current[1], color, thickness=2)
        else:
            canvas.line(*previous, *current, color, thickness=2)
        previous = current

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(canvas.encode())
    os.replace(tmp, target)
