"""The report and the token explorer in a real browser: the system's headless Chromium, driven by
Playwright (reports.browser_check), on test_report's synthetic run with its report.

Without Chromium or Playwright these tests are skipped, except under CI (the environment
variable CI set, as CI services do), where they fail: CI must run them.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module", autouse=True)
def browser_available() -> str:
    """The Chromium executable; skips (fails under CI) before any run is built when it is missing."""
    from reports.browser_check import find_chromium

    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append('Playwright (pip install -e ".[test]")')
    exe = find_chromium()
    if exe is None:
        missing.append("Chromium (apt-get install chromium, or set $CHROMIUM)")
    if missing:
        reason = "browser tests need " + " and ".join(missing)
        if _on_ci():
            pytest.fail(f"{reason}; CI is set, so this is an error, not a skip", pytrace=False)
        pytest.skip(reason)
    return exe


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """test_report's synthetic run, reported (images included); read-only for the tests."""
    from test_report import build_run, make_report

    d = build_run(tmp_path_factory.mktemp("browser_template") / "run")
    make_report(d)
    return d / "report"


def test_explorer_clicks_change_the_overlay(report_dir, tmp_path):
    """A mouse click on a word changes the overlay and the token line; so does a method button."""
    from reports.browser_check import check_explorer

    result = check_explorer(report_dir / "token_explorer.html", tmp_path)
    assert result["changed"], result
    assert result["info_before"] != result["info_after"]
    assert result["selected_after"] == result["clicked_word"] != result["selected_before"]
    assert result["method_changed"]
    assert all(Path(p).stat().st_size > 0 for p in result["screenshots"])


def test_report_first_screen(report_dir, tmp_path):
    """What a reader sees first: a heading, text, every image loaded, a screenshot of the screen."""
    from PIL import Image

    from reports.browser_check import check_report

    result = check_report(report_dir / "report.html", tmp_path)
    assert result["first_heading"], result
    assert len(result["headings"]) > 1 and all(h["text"] for h in result["headings"])
    assert result["first_heading"] in result["text"] and 0 < len(result["text"]) <= 600
    assert [h["text"] for h in result["headings"][:2]] == [result["first_heading"], "Summary"]
    summary = check_report(report_dir / "report.html", tmp_path, n_text=3000)["text"].split("Summary", 2)[-1]
    assert "were explained by" in summary and "points inside the boxes" in summary  # findings, not identity
    assert result["images"] > 0
    assert result["broken_images"] == 0, result["broken"]
    shot = Path(result["screenshot"])
    assert shot.stat().st_size > 0
    with Image.open(shot) as im:
        assert im.size == (1400, 900)
        lo, hi = im.convert("L").getextrema()
        assert hi > lo  # not a blank screen


def test_command_line(report_dir, tmp_path, capsys):
    """python -m reports.browser_check RUN/report OUT_DIR: screenshots and the two checks."""
    from reports.browser_check import main

    main([str(report_dir), str(tmp_path)])
    out = capsys.readouterr().out
    assert '"first_heading"' in out and '"changed": true' in out
    for name in ("report_full.png", "explorer_full.png", "report_first_screen.png", "explorer_after_click.png"):
        assert (tmp_path / name).stat().st_size > 0, name
