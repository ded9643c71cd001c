"""Open an HTML page in headless Chromium and report what a reader would see: the sections
present, every <img> decoded (naturalWidth > 0), console errors, network requests, and a
screenshot. Used by the report's browser test and to make docs/report.png:

    python scripts/report_browser.py demo/report.html --screenshot docs/report.png --height 1800

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages separated by NUL bytes, Chromium reading fd 3 and writing fd 4), so the standard
library is enough: no websocket client, no webdriver.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome")
# The flags that work on this project's machines (root, no display, closed network).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]

# Runs in the page once it has loaded: waits for every image to decode, then describes the page.
PROBE = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {
    title: document.title,
    sections: [...document.querySelectorAll('section[data-section]')].map(s => s.dataset.section),
    images: imgs.map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight})),
    height: document.documentElement.scrollHeight,
  };
})()"""


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, BINARIES) if p), None)


class DevTools:
    """One Chromium process and its DevTools pipe; `call` sends a command and returns its result,
    keeping every event that arrives meanwhile in `events`."""

    def __init__(self, binary: str, profile: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium wants the pipe on fds 3 and 4: move both ends above any fd the dup2s touch.
        high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=lambda: (os.dup2(high_r, 3), os.dup2(high_w, 4)))
        for fd in (to_chrome_r, from_chrome_w, high_r, high_w):
            os.close(fd)
        self.events: list[dict[str, Any]] = []
        self._inbox: queue.Queue = queue.Queue()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for m in messages:
                    self._inbox.put(json.loads(m))
        self._inbox.put(None)  # Chromium closed the pipe

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._get(timeout, method)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._get(timeout, method)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def _get(self, timeout: float, waiting_for: str) -> dict:
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"Chromium sent nothing for {timeout} s while waiting for {waiting_for}") from None
        if item is None:
            raise RuntimeError(f"Chromium exited (code {self.proc.poll()}) while waiting for {waiting_for}")
        return item

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)


def problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and any request that is not the
    page itself or a data: URI (a self-contained page makes none)."""
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')}")
        elif method == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("data:", "file:")):
            out.append(f"network request: {p['request']['url']}")
    return out


def check_page(page: str | os.PathLike, screenshot: str | os.PathLike | None = None, width: int = 1280,
               height: int | None = None, binary: str | None = None) -> dict[str, Any]:
    """Load `page` and return {"title", "sections", "images", "height", "errors"}; with
    `screenshot`, a PNG of the top `height` pixels (the whole page when None)."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(BINARIES)}): apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="report-browser-") as profile:
        dt = DevTools(binary, profile)
        try:
            return _visit(dt, Path(page).absolute().as_uri(), screenshot, width, height)
        finally:
            dt.close()


def _visit(dt: DevTools, url: str, screenshot: Any, width: int, height: int | None) -> dict[str, Any]:
    target = dt.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    s = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        dt.call(f"{domain}.enable", session=s)
    dt.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height or 1000, "deviceScaleFactor": 1,
                                                   "mobile": False}, session=s)
    dt.call("Page.navigate", {"url": url}, session=s)
    dt.wait_event("Page.loadEventFired", timeout=60)
    found = dt.call("Runtime.evaluate", {"expression": PROBE, "awaitPromise": True, "returnByValue": True},
                    session=s, timeout=60)
    if "exceptionDetails" in found:
        raise RuntimeError(f"the probe script failed: {found['exceptionDetails']}")
    result = found["result"]["value"]
    if screenshot:
        shot_h = height or result["height"]
        png = dt.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                 "clip": {"x": 0, "y": 0, "width": width, "height": shot_h, "scale": 1}},
                      session=s, timeout=120)["data"]
        Path(screenshot).write_bytes(base64.b64decode(png))
    dt.call("Runtime.evaluate", {"expression": "1"}, session=s)  # flush events queued by the page
    result["errors"] = problems(dt.events)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page")
    ap.add_argument("--screenshot", help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=None, help="screenshot height in pixels [default: the whole page]")
    args = ap.parse_args()
    r = check_page(args.page, args.screenshot, args.width, args.height)
    bad = [i for i in r["images"] if i["width"] <= 0]
    print(json.dumps({"sections": r["sections"], "images": len(r["images"]), "undecoded": bad, "errors": r["errors"]}, indent=1))
    return 1 if bad or r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
