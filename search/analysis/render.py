"""A report as a list of blocks (headings, text, tables, figures), rendered twice: as Markdown
that GitHub shows, and as one self-contained HTML file (styles inline, PNGs embedded as base64,
no external references) that a person can open in any browser or attach to an e-mail.

Text blocks use a tiny inline syntax shared by both outputs: `code`, **bold** and *italic*.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd


class Heading(NamedTuple):
    text: str
    level: int = 2


class Text(NamedTuple):
    text: str


class Code(NamedTuple):
    text: str


class Table(NamedTuple):
    frame: pd.DataFrame
    code_columns: tuple[str, ...] = ()          # cells shown as `code` (commands)
    index: bool = False                         # show the frame's index as the first column


class Image(NamedTuple):
    file: str                                   # PNG file name, relative to the report folder
    caption: str


Block = Heading | Text | Code | Table | Image


def time_unit(seconds: float) -> tuple[float, str]:
    """The unit a duration reads best in: seconds up to 2 minutes, minutes up to 2 hours, then
    hours; returned as (seconds per unit, unit)."""
    if seconds < 120:
        return 1, "s"
    return (60, "min") if seconds < 7200 else (3600, "h")


def format_seconds(seconds: float) -> str:
    """`95 s`, `12.5 min`, `3.2 h`."""
    scale, unit = time_unit(seconds)
    return f"{seconds:.0f} s" if scale == 1 else f"{seconds / scale:.1f} {unit}"


def format_cell(value: Any) -> str:
    """Numbers in a readable, stable form; missing values as an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------- Markdown

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    frame = table.frame.reset_index() if table.index else table.frame
    columns = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(columns, row):
            text = format_cell(value)
            cells.append(f"`{text}`" if column in table.code_columns and text else _md_cell(text))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Text):
            parts.append(block.text)
        elif isinstance(block, Code):
            parts.append(f"```\n{block.text}\n```")
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        elif isinstance(block, Image):
            parts.append(f"![{block.caption}]({block.file})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; display: block;
        overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f2f2f2; padding: .1em .3em; border-radius: 3px; font-size: .9em; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
"""


def _inline(text: str) -> str:
    """Escapes text, then turns `code`, **bold** and *italic* into tags."""
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", escaped)


def _html_table(table: Table) -> str:
    frame = table.frame.reset_index() if table.index else table.frame
    columns = [str(c) for c in frame.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(columns, row):
            text = html.escape(format_cell(value))
            cells.append(f"<td><code>{text}</code></td>" if column in table.code_columns and text
                         else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"


def _embedded(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: Sequence[Block], title: str, folder: Path) -> str:
    """One HTML file; images are read from `folder` and embedded."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Code):
            body.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        elif isinstance(block, Image):
            caption = html.escape(block.caption)
            body.append(f'<figure><img alt="{caption}" src="{_embedded(folder / block.file)}">'
                        f"<figcaption>{caption}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
