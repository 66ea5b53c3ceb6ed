"""Pages are safe from their data: the explorer's inline JSON and report.md escape whatever ids,
prompts and answers hold."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from reports.document import Figure, Link, Note, Paragraph, Section, Table, md_text, to_markdown
from reports.explorer import html_safe_json, render_page

HOSTILE = ["<!--<script>", "</script><b>x", "a & b", "line\u2028sep\u2029", "x]( javascript:alert(1) )", "| a | b |",
           "`code`", "*bold* [link](http://e)"]


@pytest.mark.parametrize("text", HOSTILE)
def test_inline_json_never_breaks_the_script_element(text):
    data = html_safe_json(json.dumps({"id": text, "nested": [text]}, ensure_ascii=False))
    assert not set("<>&\u2028\u2029") & set(data)
    assert json.loads(data) == {"id": text, "nested": [text]}


def test_explorer_page_keeps_one_data_script_whatever_the_ids():
    payload = {"include_images": False, "methods": ["chefer"], "samples": [
        {"sample_id": text, "prompt": text, "answer": text, "tokens": [], "maps": {}} for text in HOSTILE]}
    page = render_page(payload, title="t")
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    assert len(scripts) == 2  # the data and the page's own code, nothing injected
    assert "<!--" not in page.split("<body", 1)[1].split("</script>", 1)[0]
    assert json.loads(scripts[0])["samples"][0]["sample_id"] == HOSTILE[0]


def test_markdown_escapes_data_in_tables_links_figures_and_text():
    df = pd.DataFrame({"sample_id": HOSTILE, "n": range(len(HOSTILE))})
    sec = Section("s", "Scores").add(Paragraph(f"about {HOSTILE[0]} and `code <kept>`"), Note(HOSTILE[1]),
                                     Table("t", df, caption=HOSTILE[3]), Figure("f", b"", caption=HOSTILE[4]),
                                     Link(HOSTILE[2], "token explorer (1).html", HOSTILE[7]))
    md = to_markdown("Report " + HOSTILE[0], [sec])
    assert "<!--" not in md and "<script" not in md and "</script>" not in md and "<b>" not in md
    assert "`code &lt;kept&gt;`" in md  # code spans stay code spans
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert all(ln.count(" | ") == 1 for ln in table_rows)  # two columns: no cell split by a "|"
    assert "(token%20explorer%20%281%29.html)" in md
    assert md_text("a\nb") == "a b"
