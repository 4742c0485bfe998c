"""The report's page: sections of tables and figures, written as one self-contained HTML file
(the PNGs embedded, the style inline)."""
from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from html import escape
from typing import Any, Callable

from ..formatting import readable


@dataclass
class Figure:
    name: str  # file stem of the PNG
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Table:
    id: str
    title: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""
    # per column, how its numbers are written (one precision down a column); None: `readable`
    formats: list[Callable[[Any], str] | None] | None = None

    def cell(self, i: int, v: Any) -> str:
        f = self.formats[i] if self.formats is not None and i < len(self.formats) else None
        return readable(v) if f is None or v is None else f(v)


@dataclass
class Section:
    title: str
    subtitle: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def slug(s: str) -> str:
    """`s` as the stem of a figure's file: each run of other characters one `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1em;margin-bottom:.3em} .sub{color:#666;font-size:.85em;font-family:monospace}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em}
td.num{text-align:right;font-variant-numeric:tabular-nums} th{background:#f4f4f4}
figure{margin:1em 0} figure img{max-width:100%} figcaption,.note{color:#555;font-size:.8em}
"""

def _table_html(t: Table) -> list[str]:
    """A table's heading, its rows (numbers right-aligned) and its note."""
    out = [f"<h3>{escape(t.title)}</h3><table id=\"{escape(t.id)}\"><thead><tr>{''.join(f'<th>{escape(h)}</th>' for h in t.header)}</tr></thead><tbody>"]
    for r in t.rows:
        cells = []
        for i, v in enumerate(r):
            text = escape(t.cell(i, v))
            if isinstance(v, float):  # the number in full beside the one shown, for anyone reading the page with a program
                cells.append(f"<td class=\"num\" data-value=\"{v!r}\">{text}</td>")
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f"<td class=\"num\">{text}</td>")
            else:
                cells.append(f"<td>{text}</td>")
        out.append(f"<tr>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    if t.note:
        out.append(f"<p class=\"note\">{escape(t.note)}</p>")
    return out


def _figure_html(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    return (f"<figure><img alt=\"{escape(f.title)}\" src=\"data:image/png;base64,{data}\"><figcaption>{escape(f.title)}. {escape(f.caption)} "
            f"({escape(f.name)}.png)</figcaption></figure>")


def render_html(title: str, sections: list[Section]) -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{escape(title)}</h1>", f"<p class=\"note\">Written by pab report on {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"]
    for s in sections:
        out.append(f"<section><h2>{escape(s.title)}</h2><div class=\"sub\">{escape(s.subtitle)}</div>")
        out += [f"<p class=\"note\">{escape(n)}</p>" for n in s.notes]
        for t in s.tables:
            out += _table_html(t)
        out += [_figure_html(f) for f in s.figures]
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)
