"""Drive Debian's headless Chromium through chromedriver (the W3C WebDriver protocol over HTTP on
localhost, standard library only): load a dashboard from disk, click, read the page, screenshot.

    with Browser() as b:
        b.get(Path("runs/x/dashboard/index.html").resolve().as_uri())
        b.click(b.wait_for("tr.row"))
        png = b.screenshot()

    python -m sae.eval.webdriver SITE_DIR results/dashboard_scenes.png --latent 12

Nothing is downloaded: it needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's packages
chromium and chromium-driver). Chromium runs with the flags this machine needs: no sandbox (root),
no GPU, and no background networking, which a closed network would refuse at every start.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sae.core import files
from sae.core.config import argument, option, parse_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriverError(RuntimeError):
    """chromedriver or Chromium refused or failed a command (the message is its own)."""


def available() -> str:
    """'' when Chromium and chromedriver are installed, else what is missing (for a skip reason)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    return "" if not missing else f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium session; a context manager that always ends the session and driver."""

    def __init__(self, width: int = 1280, height: int = 1400, timeout: float = 30.0):
        self.width, self.height, self.timeout = width, height, timeout
        self.driver = self.session = self.profile = None

    def __enter__(self) -> Browser:
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        try:
            self._wait_ready()
            self.profile = tempfile.mkdtemp(prefix="sae-chromium-")
            args = FLAGS + [f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}"]
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                     "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.session is not None:
            try:
                self._call("DELETE", f"/session/{self.session}")
            except (WebDriverError, OSError):
                pass
            self.session = None
        if self.driver is not None:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
            self.driver = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def _wait_ready(self):
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise WebDriverError(f"chromedriver did not start within {self.timeout:.0f} s")

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout + 30) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            value = json.loads(e.read() or b"{}").get("value", {})
            raise WebDriverError(f"{value.get('error', e.code)}: {str(value.get('message', '')).splitlines()[0]}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    # ---- what a test needs --------------------------------------------------------------------
    def get(self, url: str):
        self._call("POST", self._s("/url"), {"url": url})

    def execute(self, script: str, *args):
        """Run `script` (a function body) in the page; returns what it returns."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", self._s("/elements"), {"using": "css selector", "value": css})
        return [e[ELEMENT] for e in found]

    def wait_for(self, css: str, timeout: float | None = None) -> str:
        """The first element matching `css`, once there is one (pages load their data as scripts)."""
        deadline = time.time() + (timeout or self.timeout)
        while time.time() < deadline:
            found = self.find_all(css)
            if found:
                return found[0]
            time.sleep(0.05)
        raise WebDriverError(f"no element {css!r} after {timeout or self.timeout:.0f} s")

    def click(self, element: str):
        self._call("POST", self._s(f"/element/{element}/click"))

    def text(self, element: str) -> str:
        return self._call("GET", self._s(f"/element/{element}/text"))

    def type(self, element: str, text: str):
        self._call("POST", self._s(f"/element/{element}/value"), {"text": text})

    def screenshot(self, full_page: bool = True) -> bytes:
        """PNG of the window; full_page first grows the window to the page's height (up to 6000 px)."""
        if full_page:
            height = min(6000, int(self.execute("return document.documentElement.scrollHeight")) + 20)
            self._call("POST", self._s("/window/rect"), {"width": self.width, "height": max(height, 200)})
        return base64.b64decode(self._call("GET", self._s("/screenshot")))


@dataclass
class ScreenshotConfig:
    site: str = argument("dashboard folder (holds index.html)")
    out: str = argument("PNG file to write")
    latent: int = option(-1, "open this latent's page (-1 = the index)")
    width: int = option(1280, "window width in pixels")


def main(argv=None) -> int:
    args = parse_config(ScreenshotConfig, argv, "python -m sae.eval.webdriver",
                        "Screenshot a dashboard's page in headless Chromium.", positional=("site", "out"))
    index = Path(args.site) / "index.html"
    reason = available() or ("" if index.is_file() else f"{index}: no such file")
    if reason:
        print(f"webdriver: error: {reason}", file=sys.stderr)
        return 2
    with Browser(width=args.width) as b:
        b.get(index.resolve().as_uri() + ("" if args.latent < 0 else f"#latent={args.latent}"))
        b.wait_for("#top .context" if args.latent >= 0 else "tr.row")
        files.make_dirs(Path(args.out).parent)
        files.write_bytes(Path(args.out), b.screenshot())
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
