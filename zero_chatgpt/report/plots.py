"""The report card's plots, as PNG bytes, from matplotlib's Agg canvas.

No pyplot: a Figure with its own FigureCanvasAgg needs no display, picks no backend and leaves no global
state behind (the report can run inside a test, a server or a training process).

Plot text is ASCII only. The default font, DejaVu Sans, has no CJK glyphs: matplotlib would draw boxes and
warn "Glyph ... missing from font(s)". Chinese belongs in the report's text, where the browser picks a font.
Every string that reaches a plot passes through `label`, so a name read from the run directory (a drop
reason, a source, a stage) cannot bring such a glyph in.
"""
from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# one colour per stage, the same in every plot (matplotlib's tab10)
STAGE_COLORS = {"pretrain": "#7f7f7f", "sft": "#1f77b4", "rm": "#8c564b", "ppo": "#d62728", "dpo": "#2ca02c",
                "grpo": "#9467bd"}


def label(s) -> str:
    """`s` as plot text: ASCII, anything else escaped (\\u4e2d) rather than drawn as a missing glyph."""
    s = str(s)
    return s if s.isascii() else s.encode("ascii", "backslashreplace").decode("ascii")


def _figure(width: float, height: float):
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})   # no version stamp: same data, same bytes
    return buf.getvalue()


def _finite(points) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x, y in points:
        if x is not None and isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y):
            xs.append(x)
            ys.append(float(y))
    return xs, ys


def funnel(rows: list[tuple[str, int, str]], title: str) -> bytes:
    """Horizontal bars, top to bottom: (name, documents, kind) with kind "in", "drop" or "out"."""
    colors = {"in": "#1f77b4", "drop": "#d62728", "out": "#2ca02c"}
    fig = _figure(8, 0.9 + 0.32 * len(rows))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    counts = [n for _, n, _ in rows]
    ax.barh(ys, counts, color=[colors.get(k, "#7f7f7f") for _, _, k in rows])
    ax.set_yticks(ys, [label(name) for name, _, _ in rows])
    top = max(counts + [1])
    for y, n in zip(ys, counts):
        ax.text(n + top * 0.01, y, f"{n:,}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("documents")
    ax.set_title(label(title))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def curves(title: str, panels: list[tuple[str, dict[str, list]]], mark: int | None = None,
           mark_label: str = "") -> bytes:
    """Side-by-side panels over training steps. panels: (y label, {series name: [(step, value), ...]});
    a series named "... (eval)" is drawn as points joined by a dashed line. mark: a step drawn as a vertical
    dotted line in every panel (the step final/ holds)."""
    n = len(panels)
    fig = _figure(4.2 * n if n > 1 else 7.5, 3.2)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (ylabel, series) in zip(axes, panels):
        drawn = 0
        for name, points in series.items():
            xs, ys = _finite(points)
            if not xs:
                continue
            drawn += 1
            if name.endswith("(eval)") or len(xs) < 3:
                ax.plot(xs, ys, "o--", markersize=4, linewidth=1, label=label(name))
            else:
                ax.plot(xs, ys, linewidth=1.2, label=label(name))
        if mark is not None:
            ax.axvline(mark, color="#555555", linestyle=":", linewidth=1.2, label=label(mark_label) or None)
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#777777")
        ax.set_xlabel("step")
        ax.set_ylabel(label(ylabel))
        ax.grid(alpha=0.3)
        if drawn > 1 or (drawn and mark is not None and mark_label):
            ax.legend(fontsize=8)
    fig.suptitle(label(title))
    return _png(fig)


def grouped_bars(title: str, metrics: list[str], stages: list[str], values: dict[str, dict[str, float]]) -> bytes:
    """One group of bars per metric, one bar per stage: values[stage][metric] (missing: no bar)."""
    fig = _figure(min(11.0, max(7.0, 0.36 * len(metrics) * max(1, len(stages)))), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(stages))
    for j, st in enumerate(stages):
        xs = [i + (j - (len(stages) - 1) / 2) * width for i, m in enumerate(metrics) if m in values.get(st, {})]
        ys = [values[st][m] for m in metrics if m in values.get(st, {})]
        ax.bar(xs, ys, width=width, label=label(st), color=STAGE_COLORS.get(st))
    ax.set_xticks(range(len(metrics)), [label(m) for m in metrics], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(stages), 6))
    ax.set_title(label(title))
    return _png(fig)


def intervals(title: str, metrics: list[str], diffs: dict[str, dict[str, dict]]) -> bytes:
    """A forest plot: per metric, each stage's paired difference to SFT with its 95 % interval
    (diffs[stage][metric] = {"diff", "ci95"}); the vertical line is 0, no difference."""
    stages = list(diffs)
    fig = _figure(7.5, 0.9 + 0.42 * len(metrics) * max(1, len(stages)) ** 0.5)
    ax = fig.add_subplot()
    step = 0.7 / max(1, len(stages))
    for j, st in enumerate(stages):
        for i, m in enumerate(metrics):
            d = diffs[st].get(m)
            if not d:
                continue
            y = len(metrics) - 1 - i + (len(stages) - 1) / 2 * step - j * step
            lo, hi = d.get("ci95", [d["diff"], d["diff"]])
            ax.errorbar([d["diff"]], [y], xerr=[[d["diff"] - lo], [hi - d["diff"]]], fmt="o", markersize=4,
                        capsize=3, color=STAGE_COLORS.get(st), label=label(st))
    ax.axvline(0, color="#333333", linewidth=1)
    ax.set_yticks(range(len(metrics)), [label(m) for m in reversed(metrics)])
    ax.set_xlabel("stage - sft (paired by prompt), 95% bootstrap interval")
    ax.grid(axis="x", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    seen: dict = {}                       # one legend entry per stage, not one per point
    for h, nm in zip(handles, names):
        seen.setdefault(nm, h)
    if seen:
        ax.legend(list(seen.values()), list(seen), fontsize=8)
    ax.set_title(label(title))
    return _png(fig)
