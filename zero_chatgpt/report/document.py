"""The report card as a list of blocks, and its two renderings: Markdown and one self-contained HTML page.

The sections (report.py) build blocks and never write markup, so report.md and report.html say the same
thing. The HTML page carries everything it shows: its CSS inline, every plot a data:image/png;base64 URI,
no script, no link to anything outside; it opens from file:// with no network. Chinese text (questions,
answers, samples) is text in the page, set in whatever CJK font the reader's system has.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

from zero_chatgpt.core.console import format_cell


@dataclass
class Block:
    kind: str                     # h1 h2 h3 p note table img pre
    text: str = ""                # heading, paragraph, caption, preformatted text, image alt text
    headers: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    name: str = ""                # img: the file name under plots/
    png: bytes = b""
    fold: bool = False            # pre: folded away in the HTML page (a <details>)


def h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


def p(text: str) -> Block:
    return Block("p", text)


def note(text: str) -> Block:
    """A part that is missing, or a caveat: set apart from the figures."""
    return Block("note", text)


def table(headers, rows, caption: str = "") -> Block:
    return Block("table", caption, headers=list(headers), rows=[list(r) for r in rows])


def img(name: str, png: bytes, alt: str) -> Block:
    return Block("img", alt, name=name, png=png)


def pre(text: str, fold: bool = False) -> Block:
    return Block("pre", text, fold=fold)


def cell(v) -> str:
    return "-" if v is None else format_cell(v)


def _numeric_columns(rows: list[list]) -> list[bool]:
    """Columns of numbers (ints and floats; empty cells aside): right-aligned, like the console's tables."""
    n = max((len(r) for r in rows), default=0)
    cols = [[r[i] for r in rows if i < len(r) and r[i] not in (None, "")] for i in range(n)]
    return [bool(c) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in c) for c in cols]


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


# ---------------------------------------------------------------- Markdown

def _md_cell(v) -> str:
    # escaped: an answer is model output, and "<tag>" in it would be markup to a Markdown renderer
    return html.escape(cell(v), quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind[0] == "h":
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "note":
            out.append(f"> {b.text}")
        elif b.kind == "table":
            if b.text:
                out.append("*" + b.text.replace("*", "\\*") + "*")
            num = _numeric_columns(b.rows) + [False] * len(b.headers)
            rows = [" | ".join(_md_cell(x) for x in b.headers)]
            rows.append(" | ".join("---:" if num[i] else "---" for i in range(len(b.headers))))
            rows += [" | ".join(_md_cell(x) for x in r) for r in b.rows]
            out.append("\n".join(f"| {r} |" for r in rows))
        elif b.kind == "img":
            out.append(f"![{b.text}](plots/{b.name})")
        elif b.kind == "pre":
            out.append("```\n" + b.text.rstrip("\n") + "\n```")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", "PingFang SC",
       "Microsoft YaHei", "WenQuanYi Micro Hei", sans-serif; color: #1d1d1f; background: #fff; margin: 0;
       line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.5rem 4rem; }
h1 { font-size: 1.7rem; margin: 0.2rem 0 0.6rem; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 0.6rem; padding-bottom: 0.25rem; border-bottom: 2px solid #e3e3e8; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 0.4rem; }
nav { font-size: 0.9rem; margin: 0.4rem 0 1rem; }
nav a { margin-right: 0.9rem; color: #0b61c4; text-decoration: none; }
p { margin: 0.4rem 0 0.7rem; }
.note { background: #fff8e6; border-left: 4px solid #f0b400; padding: 0.45rem 0.8rem; margin: 0.6rem 0;
        font-size: 0.95rem; }
table { border-collapse: collapse; margin: 0.3rem 0 1rem; font-size: 0.88rem; }
p.cap { color: #555; font-size: 0.85rem; margin: 0.8rem 0 0.2rem; }
th, td { border: 1px solid #d9d9de; padding: 0.25rem 0.55rem; vertical-align: top; }
th { background: #f4f4f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; max-width: 44rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.4rem 0 1rem; }
pre { background: #f6f8fa; padding: 0.7rem; overflow-x: auto; font-size: 0.8rem; }
details summary { cursor: pointer; color: #0b61c4; }
"""


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _lang(s: str) -> str:
    """lang="zh-CN" on Chinese text: with the page's "en", a browser may set Han in a Japanese font."""
    return ' lang="zh-CN"' if re.search(r"[\u3400-\u9fff\uf900-\ufaff]", s) else ""


def to_html(blocks: list[Block], title: str) -> str:
    toc = [b.text for b in blocks if b.kind == "h2"]
    body: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            body.append(f"<h1>{_esc(b.text)}</h1>")
            if toc:
                body.append("<nav>" + "".join(f'<a href="#{_anchor(t)}">{_esc(t)}</a>' for t in toc) + "</nav>")
        elif b.kind in ("h2", "h3"):
            ident = f' id="{_anchor(b.text)}"' if b.kind == "h2" else ""
            body.append(f"<{b.kind}{ident}{_lang(b.text)}>{_esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p{_lang(b.text)}>{_esc(b.text)}</p>")
        elif b.kind == "note":
            body.append(f'<p class="note"{_lang(b.text)}>{_esc(b.text)}</p>')
        elif b.kind == "table":
            if b.text:                    # above the table, not a <caption>: a narrow table would wrap it
                body.append(f'<p class="cap">{_esc(b.text)}</p>')
            rows = []
            rows.append("<tr>" + "".join(f"<th>{_esc(x)}</th>" for x in b.headers) + "</tr>")
            num = _numeric_columns(b.rows)
            for r in b.rows:
                tds = []
                for i, x in enumerate(r):
                    s = cell(x)
                    cls = "num" if num[i] else ("text" if len(s) > 40 or "\n" in s else "")
                    attrs = (f' class="{cls}"' if cls else "") + _lang(s)
                    tds.append(f"<td{attrs}>{_esc(s)}</td>")
                rows.append("<tr>" + "".join(tds) + "</tr>")
            body.append("<table>" + "".join(rows) + "</table>")
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<img src="data:image/png;base64,{data}" alt="{_esc(b.text)}">')
        elif b.kind == "pre":
            block = f"<pre>{_esc(b.text)}</pre>"
            body.append(f"<details><summary>show</summary>{block}</details>" if b.fold else block)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")
