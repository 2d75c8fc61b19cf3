"""Draw grouped, stacked bar charts as PNGs with matplotlib (Agg: no display needed).

`stacked_bar_chart(path, panels, series=..., ...)` draws one panel per group (e.g. per world size),
one bar per item inside it, each bar cut into one coloured segment per series, labelled
"code: name" under it. matplotlib is optional (`pip install shardoptim[examples]`): without it
the chart is skipped with one printed line.

Must not import torch or shardoptim.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

#: One colour per series (params, grads, state, master in benchmarks/memory.py).
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def stacked_bar_chart(
    path: str | os.PathLike[str],
    panels: Sequence[tuple[str, Sequence[Sequence[float]]]],
    *,
    series: Sequence[str],
    codes: Sequence[str],
    names: Sequence[str],
    y_label: str,
) -> bool:
    """Write a PNG of stacked bars, one panel per group; return whether it was written.

    Args:
        path: where to write (parent directories are created; written to `<path>.tmp`, renamed).
        panels: (panel title, bars); each bar is one value per series, stacked bottom to top.
            Every panel has the same bars in the same order (a bar of all zeros is left empty).
        series: the name of each segment, in stacking order (the legend).
        codes: a short label for each bar ("a", "b", ...), as in the benchmark's tables.
        names: what each code stands for.
        y_label: the title of the shared y axis (e.g. "MiB per rank").

    Returns:
        False, after printing one line saying how to install it, when matplotlib is missing.
    """
    num_bars = len(codes)
    if any(len(bars) != num_bars for _, bars in panels) or len(names) != num_bars:
        raise ValueError(
            f"every panel needs {num_bars} bars (one per code) and one name per code; got "
            f"{[len(bars) for _, bars in panels]} bars per panel and {len(names)} names"
        )
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"skipped the chart {path}: matplotlib is not installed (pip install shardoptim[examples])")
        return False
    width_in = max(6.4, 1.2 + len(panels) * (0.45 * num_bars + 0.6))
    fig = Figure(figsize=(width_in, 4.8), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(panels), 1), sharey=True, squeeze=False)[0]
    labels = [f"{code}: {name}" for code, name in zip(codes, names)]
    for ax, (title, bars) in zip(axes, panels):
        bottoms = [0.0] * num_bars
        for s, name in enumerate(series):
            heights = [bar[s] for bar in bars]
            ax.bar(range(num_bars), heights, bottom=bottoms, color=PALETTE[s % len(PALETTE)], label=name)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(num_bars), labels, rotation=35, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(y_label, fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    canvas.print_png(str(tmp))
    os.replace(tmp, target)
    return True
