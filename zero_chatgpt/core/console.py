"""Console output shared by every stage: messages, progress bars, summary tables.

Only rank 0 prints under torchrun, so N processes do not print N copies.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Sequence

from tqdm import tqdm


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def info(msg: str) -> None:
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


def progress(iterable: Iterable | None = None, *, total: int | float | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, **kw) -> tqdm:
    """A progress bar with rate and ETA; silent on ranks other than 0, when ZC_NO_PROGRESS=1, and with disable."""
    disable = disable or not is_main_process() or os.environ.get("ZC_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                unit_scale=unit not in ("it", "step"), file=sys.stderr, **kw)


def format_cell(v) -> str:
    """A table cell as every summary table shows it: thousands separators, 4 decimals, small and huge
    numbers in e-notation."""
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:,.4f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


SMALL_N = 30      # below this many items a share is shown with its n


def share(value: float | None, n: int | None, fmt: str = ".3f") -> str:
    """A share measured on n items, as every summary prints it: "1.000 (n=2)" when n < SMALL_N, where one
    item moves it by more than 3 points and 1.000 may be 2 of 2; plain above; "-" when there is none.
    n None (a record from before n was kept): "(n unknown)", never a bare figure that may rest on 2 items."""
    if value is None:
        return "-"
    if n is None:
        return f"{value:{fmt}} (n unknown)"
    return f"{value:{fmt}}" + (f" (n={n:,})" if n < SMALL_N else "")


def _width(s: str) -> int:
    # CJK characters take two terminal columns.
    return sum(2 if "\u2e80" <= ch <= "\uffef" else 1 for ch in s)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> str:
    cells = [[format_cell(v) for v in r] for r in rows]
    widths = [max([_width(h)] + [_width(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(vals, numeric_right=True):
        out = []
        for i, v in enumerate(vals):
            pad = " " * (widths[i] - _width(v))
            right = numeric_right and i > 0 and v[:1].isdigit() or v[:1] == "-" and v[1:2].isdigit()
            out.append(pad + v if right else v + pad)
        return "│ " + " │ ".join(out) + " │"

    sep = "├─" + "─┼─".join("─" * w for w in widths) + "─┤"
    top = "┌─" + "─┬─".join("─" * w for w in widths) + "─┐"
    bot = "└─" + "─┴─".join("─" * w for w in widths) + "─┘"
    parts = ([title] if title else []) + [top, line(headers, False), sep] + [line(r) for r in cells] + [bot]
    return "\n".join(parts)


def table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> None:
    """Print a summary table (the end of every stage prints one)."""
    if is_main_process():
        print(format_table(headers, rows, title), file=sys.stderr, flush=True)
