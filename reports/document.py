"""A small document model for the report and its Markdown and self-contained HTML renderings.

A report is a list of :class:`Section`; a section is a list of blocks (paragraphs, notes,
tables, figures, links). The same blocks are written as ``report.md`` (figures referenced as
``figures/<name>.png``, long tables cut with a pointer to the CSV, collapsed detail tables as a
pointer only) and as ``report.html``
(figures embedded as base64 PNG, styles inline, no external resource of any kind: it opens
offline and can be mailed as one file). Every table is also written in full as
``tables/<name>.csv``.

Inline markup in paragraphs and notes: ```code``` spans only; everything else is escaped.
"""
from __future__ import annotations

import base64
import html
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Union

import pandas as pd


@dataclass
class Paragraph:
    """Plain text (```code``` spans allowed)."""

    text: str


@dataclass
class Note:
    """Something the reader must know: a missing table, a skipped section, a caveat."""

    text: str


@dataclass
class Table:
    """A table shown in the report and written in full to ``tables/<name>.csv``.

    ``display`` is the formatted version shown (strings, e.g. 'mean [lo, hi]'); ``data`` the raw
    numbers written to CSV (default: ``display``). ``max_rows`` cuts the displayed table;
    ``collapsed`` puts it in a closed <details> element in HTML.
    """

    name: str
    display: pd.DataFrame
    caption: str = ""
    data: pd.DataFrame | None = None
    max_rows: int = 60
    collapsed: bool = False
    key_value: bool = False  # an item/value list: left-aligned, no link to its CSV

    @property
    def csv_frame(self) -> pd.DataFrame:
        return self.display if self.data is None else self.data


@dataclass
class Figure:
    """A PNG figure, written to ``figures/<name>.png`` and embedded in HTML."""

    name: str
    png: bytes
    caption: str = ""


@dataclass
class Link:
    """A link to another file of the report directory (relative href)."""

    text: str
    href: str
    description: str = ""


Block = Union[Paragraph, Note, Table, Figure, Link]


@dataclass
class Section:
    """One report section: an anchor id, a title and its blocks."""

    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> "Section":
        self.blocks.extend(blocks)
        return self


# ---------------------------------------------------------------------------------------------
# Markdown


_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")  # "_" inside a word is no emphasis in CommonMark


def md_text(text: object) -> str:
    """Text from the data (ids, prompts, answers, labels) made inert in Markdown: HTML's <, > and &
    as entities (so no tag or comment opens), Markdown's punctuation backslash-escaped, line
    breaks (U+2028 and U+2029 too) as spaces."""
    s = html.escape("" if text is None else str(text), quote=False)
    return re.sub(r"[\r\n\u2028\u2029]", " ", _MD_SPECIAL.sub(r"\\\1", s))


def md_href(href: str) -> str:
    """A link target that cannot end the link early: spaces, parentheses and angle brackets
    percent-encoded."""
    return urllib.parse.quote(str(href), safe="/#?=&%:.-_~,+")


def md_prose(text: str) -> str:
    """Paragraph text: ```code``` spans kept (their content escaped as HTML), the rest `md_text`."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(f"`{html.escape(p[1:-1], quote=False)}`" if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else md_text(p) for p in parts)


def _md_escape_cell(x: object) -> str:
    s = "" if x is None else str(x)
    return "–" if s == "nan" else md_text(s)


def markdown_table(df: pd.DataFrame, max_rows: int | None = None) -> str:
    """A GitHub-flavoured pipe table (cut to `max_rows` rows)."""
    shown = df if max_rows is None else df.head(max_rows)
    cols = [str(c) for c in shown.columns]
    lines = ["| " + " | ".join(_md_escape_cell(c) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in shown.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_md_escape_cell(v) for v in row) + " |")
    return "\n".join(lines)


def to_markdown(title: str, sections: list[Section], intro: str = "") -> str:
    """The whole report as Markdown (figures and CSVs referenced by relative path)."""
    out = [f"# {md_text(title)}", ""]
    if intro:
        out += [md_prose(intro), ""]
    out += ["Contents: " + " · ".join(f"[{md_text(s.title)}](#{md_href(s.id)})" for s in sections), ""]
    for s in sections:
        out += [f'<a id="{html.escape(s.id, quote=True)}"></a>', f"## {md_text(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Paragraph):
                out += [md_prose(b.text), ""]
            elif isinstance(b, Note):
                out += [f"> **Note:** {md_prose(b.text)}", ""]
            elif isinstance(b, Table):
                if b.collapsed and len(b.display) > 20:  # long detail tables: only a pointer to the CSV
                    out += [f"_{md_text(b.caption or b.name)}: {len(b.display)} rows in "
                            f"[tables/{md_text(b.name)}.csv]({md_href(f'tables/{b.name}.csv')})_", ""]
                    continue
                if b.caption:
                    out += [f"**{md_text(b.caption)}**", ""]
                if b.display.empty:
                    out += ["(no rows)", ""]
                    continue
                out += [markdown_table(b.display, b.max_rows), ""]
                cut = len(b.display) - b.max_rows
                if cut > 0 or not b.key_value:
                    more = f"{cut} more rows in " if cut > 0 else "Full table: "
                    out += [f"_{more}[tables/{md_text(b.name)}.csv]({md_href(f'tables/{b.name}.csv')})_", ""]
            elif isinstance(b, Figure):
                out += [f"![{md_text(b.caption or b.name)}]({md_href(f'figures/{b.name}.png')})", ""]
                if b.caption:
                    out += [f"_{md_text(b.caption)}_", ""]
            elif isinstance(b, Link):
                out += [f"[{md_text(b.text)}]({md_href(b.href)})" + (f": {md_text(b.description)}" if b.description else ""), ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9;line-height:1.45}
main{max-width:1280px;margin:0 auto;padding:24px 32px 64px;background:#fff;min-height:100vh;
box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:1.7em;margin:.2em 0 .3em}h2{font-size:1.3em;margin-top:2.2em;padding-top:.6em;
border-top:1px solid #e3e6ea}
nav.toc{font-size:.92em;background:#f1f4f8;padding:10px 14px;border-radius:6px;margin:12px 0 8px}
nav.toc a{margin-right:14px;white-space:nowrap;color:#1f5fae;text-decoration:none}
nav.toc a:hover{text-decoration:underline}
p{margin:.5em 0 .8em}
.note{background:#fff6dd;border-left:4px solid #e0b000;padding:8px 12px;margin:10px 0;
border-radius:3px;font-size:.95em}
.tablewrap{overflow-x:auto;margin:6px 0 4px}
table{border-collapse:collapse;font-size:.84em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;position:sticky;top:0}
tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;white-space:nowrap}
table.kv td:first-child{white-space:nowrap;color:#37404c}table.kv td{max-width:900px;word-break:break-word}
.caption{font-weight:600;margin:14px 0 2px;font-size:.95em}
.more{font-size:.82em;color:#5b6572;margin:2px 0 12px}
figure{margin:14px 0 20px}figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{font-size:.88em;color:#4a5360;margin-top:4px}
details summary{cursor:pointer;color:#1f5fae;margin:8px 0;font-size:.95em}
code{background:#f0f2f5;padding:0 3px;border-radius:3px;font-size:.92em}
a.button{display:inline-block;background:#1f5fae;color:#fff;padding:6px 14px;border-radius:5px;
text-decoration:none;margin:4px 0}
.footer{margin-top:40px;font-size:.8em;color:#7a838f}
"""

_NUMERIC = re.compile(r"^[\s+\-–]?[\d.,]+(\s*\[[\d.,\s\-–]+\])?%?$|^–$")


def _inline(text: str) -> str:
    """Escape text; turn `code` spans into <code>."""
    parts = re.split(r"(`[^`]+`)", text)
    return "".join(f"<code>{html.escape(p[1:-1])}</code>" if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else html.escape(p) for p in parts)


def html_table(df: pd.DataFrame, max_rows: int | None = None, align_numbers: bool = True, cls: str = "") -> str:
    shown = df if max_rows is None else df.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    for row in shown.itertuples(index=False, name=None):
        cells = []
        for v in row:
            s = "–" if v is None or (isinstance(v, float) and v != v) else str(v)
            cls = ' class="num"' if align_numbers and _NUMERIC.match(s) else ""
            cells.append(f"<td{cls}>{html.escape(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls_attr = f' class="{cls}"' if cls else ""
    return f'<div class="tablewrap"><table{cls_attr}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_html(title: str, sections: list[Section], intro: str = "", footer: str = "") -> str:
    """The whole report as one self-contained HTML page (no external resources)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>{html.escape(title)}</h1>"]
    if intro:
        out.append(f"<p>{_inline(intro)}</p>")
    out.append('<nav class="toc">' + " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
               + "</nav>")
    for s in sections:
        out.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Paragraph):
                out.append(f"<p>{_inline(b.text)}</p>")
            elif isinstance(b, Note):
                out.append(f'<div class="note">{_inline(b.text)}</div>')
            elif isinstance(b, Table):
                cap = f'<div class="caption">{_inline(b.caption)}</div>' if b.caption else ""
                if b.display.empty:
                    out.append(cap + '<p class="more">(no rows)</p>')
                    continue
                table = html_table(b.display, b.max_rows, align_numbers=not b.key_value,
                                   cls="kv" if b.key_value else "")
                cut = len(b.display) - b.max_rows
                link = f'<a href="tables/{b.name}.csv">tables/{b.name}.csv</a>'
                more = f"{cut} more rows in {link}" if cut > 0 else ("" if b.key_value else f"Full table: {link}")
                body = table + (f'<div class="more">{more}</div>' if more else "")
                if b.collapsed:
                    summary = html.escape(b.caption or b.name) + f" ({len(b.display)} rows)"
                    out.append(f"<details><summary>{summary}</summary>{body}</details>")
                else:
                    out.append(cap + body)
            elif isinstance(b, Figure):
                alt = html.escape(b.caption or b.name, quote=True)
                cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
                out.append(f'<figure id="fig-{b.name}"><img alt="{alt}" src="{png_data_uri(b.png)}">{cap}</figure>')
            elif isinstance(b, Link):
                desc = f" {_inline(b.description)}" if b.description else ""
                out.append(f'<p><a class="button" href="{html.escape(b.href, quote=True)}">{html.escape(b.text)}</a>'
                           f"{desc}</p>")
        out.append("</section>")
    if footer:
        out.append(f'<div class="footer">{_inline(footer)}</div>')
    out.append("</main></body></html>")
    return "\n".join(out)
