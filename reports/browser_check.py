"""Look at the report as a reader would: headless Chromium driven over the DevTools protocol.

A dependency-free DevTools client (a minimal RFC 6455 WebSocket over a plain socket) that

* takes screenshots of report.html and token_explorer.html, and
* clicks a word of an answer in the explorer with real mouse events and checks that the overlay
  canvas and the token information change (and that switching the method changes it too).

Used by the test suite (skipped where Chromium is absent) and from the command line::

    python -m reports.browser_check RUN/report OUT_DIR

Only the Chromium process started here is ever stopped (by its own handle).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


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


class _WebSocket:
    """Just enough of a WebSocket client for the DevTools protocol (text frames, no extensions)."""

    def __init__(self, url: str, timeout: float = 30.0):
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + (f"?{u.query}" if u.query else "")
        req = (f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"WebSocket handshake refused: {status!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        head = bytes([0x81])
        n = len(data)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(head + mask + masked)

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            op = b0 & 0x0F
            if op == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if op in (0x9, 0xA):  # ping / pong: ignore
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Browser:
    """A headless Chromium with remote debugging and one page; use as a context manager."""

    def __init__(self, width: int = 1400, height: int = 2000, executable: str | None = None):
        self.width, self.height = width, height
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no chromium executable found (install Debian's chromium package)")
        self.proc: subprocess.Popen | None = None
        self.ws: _WebSocket | None = None
        self._id = 0

    def __enter__(self) -> "Browser":
        self.profile = tempfile.mkdtemp(prefix="report-chromium-")
        args = [self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0", f"--window-size={self.width},{self.height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        ws_url = None
        while ws_url is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                ws_url = pages[0]["webSocketDebuggerUrl"]
            elif time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("chromium has no page target")
            else:
                time.sleep(0.05)
        self.ws = _WebSocket(ws_url)
        self.call("Page.enable")
        self.call("Runtime.enable")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(getattr(self, "profile", ""), ignore_errors=True)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are dropped)."""
        assert self.ws is not None
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its (JSON) value."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def open(self, path_or_url: str | Path, ready: str = "true", timeout: float = 30.0) -> None:
        """Navigate and wait until the document is loaded and `ready` (a JS expression) is true."""
        url = str(path_or_url)
        if "://" not in url:
            url = Path(url).resolve().as_uri()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.eval(f"document.readyState === 'complete' && !!({ready})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become ready")
            time.sleep(0.05)

    def click(self, x: float, y: float) -> None:
        """A real left click at viewport coordinates (CSS pixels)."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: str | Path, full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or of the whole page)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            h = int(self.eval("Math.ceil(document.documentElement.scrollHeight)"))
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width, "height": min(h, 16000), "scale": 1})
        data = self.call("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


_CANVAS_HASH = """(() => { const c = window.explorer.cards[%d].canvas; const d = c.getContext('2d')
  .getImageData(0, 0, c.width, c.height).data; let h = 2166136261 >>> 0;
  for (let i = 0; i < d.length; i += 3) { h ^= d[i]; h = Math.imul(h, 16777619) >>> 0; } return h; })()"""


def check_explorer(explorer_html: str | Path, out_dir: str | Path, card: int = 0) -> dict[str, Any]:
    """Click the last word of one answer in the explorer; report whether the overlay changed.

    Returns canvas hashes, the info line and selection before and after, whether switching the
    method changed the canvas too, and the screenshots taken (before, after, method switched).
    """
    out_dir = Path(out_dir)
    shots = []
    with Browser(1400, 1200) as b:
        b.open(explorer_html, ready="window.explorer && window.explorer.cards.length > 0 && "
                                   "window.explorer.cards.every(c => !c.img || c.img.complete)")
        b.eval(f"window.explorer.cards[{card}].canvas.scrollIntoView({{block: 'start'}})")
        time.sleep(0.1)
        before = {"hash": b.eval(_CANVAS_HASH % card), "info": b.eval(f"window.explorer.cards[{card}].info.textContent"),
                  "sel": b.eval(f"window.explorer.cards[{card}].sel")}
        shots.append(str(b.screenshot(out_dir / "explorer_before_click.png")))
        n = int(b.eval(f"window.explorer.cards[{card}].wordSpans.length"))
        k = n - 1 if before["sel"] != n - 1 else 0
        rect = b.eval(f"""(() => {{ const s = window.explorer.cards[{card}].wordSpans[{k}];
            s.scrollIntoView({{block: 'center'}}); const r = s.getBoundingClientRect();
            return {{x: r.left + r.width / 2, y: r.top + r.height / 2, text: s.textContent}}; }})()""")
        time.sleep(0.1)
        b.click(rect["x"], rect["y"])
        time.sleep(0.1)
        after = {"hash": b.eval(_CANVAS_HASH % card), "info": b.eval(f"window.explorer.cards[{card}].info.textContent"),
                 "sel": b.eval(f"window.explorer.cards[{card}].sel")}
        shots.append(str(b.screenshot(out_dir / "explorer_after_click.png")))
        methods = b.eval("Array.from(document.querySelectorAll('#methods button')).map(x => x.dataset.m)")
        current = b.eval("window.explorer.method")
        other = next((m for m in methods if m != current), None)
        method_changed = None
        if other:
            r = b.eval(f"""(() => {{ const e = document.querySelector('#methods button[data-m="{other}"]');
                const r = e.getBoundingClientRect(); return {{x: r.left + r.width / 2, y: r.top + r.height / 2}}; }})()""")
            b.click(r["x"], r["y"])
            time.sleep(0.1)
            method_changed = b.eval(_CANVAS_HASH % card) != after["hash"] and b.eval("window.explorer.method") == other
            shots.append(str(b.screenshot(out_dir / "explorer_method_switched.png")))
    return {"changed": before["hash"] != after["hash"], "hash_before": before["hash"], "hash_after": after["hash"],
            "info_before": before["info"], "info_after": after["info"], "selected_before": before["sel"],
            "selected_after": after["sel"], "clicked_word": k, "clicked_text": rect["text"],
            "method_changed": method_changed, "screenshots": shots}


def screenshot_report(report_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Full-page screenshots of report.html (and of the explorer when present)."""
    report_dir, out_dir = Path(report_dir), Path(out_dir)
    shots = []
    with Browser(1400, 1200) as b:
        b.open(report_dir / "report.html")
        shots.append(str(b.screenshot(out_dir / "report_full.png", full_page=True)))
        if (report_dir / "token_explorer.html").is_file():
            b.open(report_dir / "token_explorer.html", ready="window.explorer")
            time.sleep(0.2)
            shots.append(str(b.screenshot(out_dir / "explorer_full.png", full_page=True)))
    return shots


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Screenshot a report and click through its token explorer.")
    ap.add_argument("report_dir")
    ap.add_argument("out_dir")
    a = ap.parse_args(argv)
    print(json.dumps({"screenshots": screenshot_report(a.report_dir, a.out_dir)}, indent=1))
    explorer = Path(a.report_dir) / "token_explorer.html"
    if explorer.is_file():
        print(json.dumps(check_explorer(explorer, a.out_dir), indent=1))


if __name__ == "__main__":
    main()
