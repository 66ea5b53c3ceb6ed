"""Look at the report as a reader would: the system's headless Chromium driven by Playwright.

* :func:`check_report` opens report.html at 1400 x 900 and returns what a reader sees first (the
  first heading, the start of the visible text, a screenshot of the first screen) and how many of
  its images failed to load;
* :func:`check_explorer` clicks a word of an answer in token_explorer.html with the mouse and
  checks that the overlay canvas and the token information change (and that switching the method
  changes it too);
* :func:`screenshot_report` takes full-page screenshots of both pages.

Playwright (``pip install -e ".[test]"``) launches the Chromium found by :func:`find_chromium`
(Debian's ``chromium`` package; ``$CHROMIUM`` to choose another), never a downloaded browser, with
flags for a machine without network access. Used by the test suite and from the command line::

    python -m reports.browser_check RUN/report OUT_DIR
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Headless, no sandbox (containers, root), and nothing that reaches out to the network on its own.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")

TIMEOUT_MS = 30_000


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome executable ($CHROMIUM first), or None."""
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in BROWSERS:
        p = shutil.which(name)
        if p:
            return p
    return None


@contextmanager
def _page(width: int, height: int, executable: str | None = None) -> Iterator[Any]:
    """A fresh page of a newly launched headless Chromium, closed (browser and driver) on exit."""
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium executable found (install Debian's chromium package, or set $CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise ImportError('Playwright is not installed: pip install -e ".[test]" (or pip install playwright)') from e
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True,
                                    timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def _open(page: Any, path: str | Path, ready: str | None = None) -> None:
    """Navigate to a local file, wait for its load event and then until `ready` (JS) is true."""
    page.goto(Path(path).resolve().as_uri(), wait_until="load")
    if ready:
        page.wait_for_function(f"() => !!({ready})")


def _shot(page: Any, path: Path, full_page: bool = False) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return str(path)


_CANVAS_HASH = """(c) => { const cv = window.explorer.cards[c].canvas; const d = cv.getContext('2d')
  .getImageData(0, 0, cv.width, cv.height).data; let h = 2166136261 >>> 0;
  for (let i = 0; i < d.length; i += 3) { h ^= d[i]; h = Math.imul(h, 16777619) >>> 0; } return h; }"""

_CARD_STATE = """(c) => { const k = window.explorer.cards[c];
  return {info: k.info.textContent, sel: k.sel, n: k.wordSpans.length}; }"""

_EXPLORER_READY = ("window.explorer && window.explorer.cards.length > 0 && "
                   "window.explorer.cards.every(c => !c.img || c.img.complete)")


def check_explorer(explorer_html: str | Path, out_dir: str | Path, card: int = 0) -> dict[str, Any]:
    """Click the last word of one answer in the explorer; report whether the overlay changed.

    Returns canvas hashes, the info line and selection before and after, whether switching the
    method (a click on another method's button) changed the canvas too, and the screenshots taken
    (before, after, method switched). Both clicks are mouse clicks at the element's position.
    """
    out_dir = Path(out_dir)
    shots = []
    with _page(1400, 1200) as page:
        _open(page, explorer_html, ready=_EXPLORER_READY)
        page.evaluate("(c) => window.explorer.cards[c].canvas.scrollIntoView({block: 'start'})", card)
        before = page.evaluate(_CARD_STATE, card)
        before["hash"] = page.evaluate(_CANVAS_HASH, card)
        shots.append(_shot(page, out_dir / "explorer_before_click.png"))
        n = int(before["n"])
        k = n - 1 if before["sel"] != n - 1 else 0
        word = page.evaluate_handle("([c, k]) => window.explorer.cards[c].wordSpans[k]", [card, k]).as_element()
        if word is None:
            raise RuntimeError(f"card {card} has no word span {k}")
        text = word.text_content()
        word.click()  # scrolls it into view, then a mouse press and release at its centre
        page.wait_for_function("([c, k]) => window.explorer.cards[c].sel === k", arg=[card, k])
        after = page.evaluate(_CARD_STATE, card)
        after["hash"] = page.evaluate(_CANVAS_HASH, card)
        shots.append(_shot(page, out_dir / "explorer_after_click.png"))
        methods = page.evaluate("() => Array.from(document.querySelectorAll('#methods button')).map(x => x.dataset.m)")
        current = page.evaluate("() => window.explorer.method")
        other = next((m for m in methods if m != current), None)
        method_changed = None
        if other:
            page.locator("#methods button").nth(methods.index(other)).click()
            page.wait_for_function("(m) => window.explorer.method === m", arg=other)
            method_changed = page.evaluate(_CANVAS_HASH, card) != after["hash"]
            shots.append(_shot(page, out_dir / "explorer_method_switched.png"))
    return {"changed": before["hash"] != after["hash"], "hash_before": before["hash"], "hash_after": after["hash"],
            "info_before": before["info"], "info_after": after["info"], "selected_before": before["sel"],
            "selected_after": after["sel"], "clicked_word": k, "clicked_text": text,
            "method_changed": method_changed, "screenshots": shots}


_REPORT_STATE = """async (nText) => {
  const headings = Array.from(document.querySelectorAll('h1, h2, h3, h4, h5, h6'))
    .map(h => ({level: Number(h.tagName[1]), text: h.innerText.trim()}));
  const text = document.body ? document.body.innerText.replace(/\\s+/g, ' ').trim() : '';
  // lazy images below the first screen: load them too, then wait (at most 10 s) for every image
  const imgs = Array.from(document.images);
  imgs.forEach(i => { if (i.loading === 'lazy') i.loading = 'eager'; });
  await Promise.race([Promise.all(imgs.map(i => i.decode().catch(() => null))),
                      new Promise(r => setTimeout(r, 10000))]);
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0)
    .map(i => (i.getAttribute('alt') || '') + ' <' + (i.getAttribute('src') || '').slice(0, 80) + '>');
  return {title: document.title, headings: headings, text: text.slice(0, nText),
          images: imgs.length, broken: broken};
}"""


def check_report(report_html: str | Path, out_dir: str | Path, width: int = 1400, height: int = 900,
                 n_text: int = 600) -> dict[str, Any]:
    """Open report.html as a reader would and return what the first screen shows.

    Keys: ``title``; ``first_heading`` (text of the first h1-h6, or None); ``headings`` (every
    heading in document order, ``{"level", "text"}``); ``text`` (the first `n_text` characters of
    the rendered, visible text, whitespace collapsed); ``images`` (number of <img> elements);
    ``broken_images`` (how many have not loaded: naturalWidth 0); ``broken`` (alt and start of
    src of each); ``screenshot`` (PNG of the first `width` x `height` screen).
    """
    out_dir = Path(out_dir)
    with _page(width, height) as page:
        _open(page, report_html)
        shot = _shot(page, out_dir / "report_first_screen.png")
        state = page.evaluate(_REPORT_STATE, n_text)
    headings = state["headings"]
    return {"title": state["title"], "first_heading": headings[0]["text"] if headings else None,
            "headings": headings, "text": state["text"], "images": state["images"],
            "broken_images": len(state["broken"]), "broken": state["broken"], "screenshot": shot}


def screenshot_report(report_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Full-page screenshots of report.html (and of the explorer when present)."""
    report_dir, out_dir = Path(report_dir), Path(out_dir)
    shots = []
    with _page(1400, 1200) as page:
        _open(page, report_dir / "report.html")
        shots.append(_shot(page, out_dir / "report_full.png", full_page=True))
        if (report_dir / "token_explorer.html").is_file():
            _open(page, report_dir / "token_explorer.html", ready=_EXPLORER_READY)
            shots.append(_shot(page, out_dir / "explorer_full.png", full_page=True))
    return shots


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Screenshot a report, check its first screen and click through "
                                             "its token explorer.")
    ap.add_argument("report_dir")
    ap.add_argument("out_dir")
    a = ap.parse_args(argv)
    report_dir = Path(a.report_dir)
    print(json.dumps({"screenshots": screenshot_report(report_dir, a.out_dir)}, indent=1))
    print(json.dumps(check_report(report_dir / "report.html", a.out_dir), indent=1))
    explorer = report_dir / "token_explorer.html"
    if explorer.is_file():
        print(json.dumps(check_explorer(explorer, a.out_dir), indent=1))


if __name__ == "__main__":
    main()
