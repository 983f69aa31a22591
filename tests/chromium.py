"""Headless Chromium driven over the DevTools protocol on a pipe (no port, no websocket library): load a page,
collect what failed, read the DOM, take a screenshot. Test support only.

Chromium reads commands from fd 3 and writes replies and events to fd 4, each a JSON message ended by a NUL byte
(`--remote-debugging-pipe`, the transport Playwright uses). Every wait is bounded by one deadline.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# The flags of /work/.library/env/machines/python.md: no sandbox (root in CI), no GPU, nothing phones home.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe")
VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen
MAX_SCREENSHOT_HEIGHT = 16000  # px; Chromium refuses much taller captures


def executable() -> str | None:
    """Debian's `chromium` (or a Chrome found on PATH), None if none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _above_4(fd: int) -> int:
    """The same pipe end on a descriptor >= 10 (close-on-exec), so moving ends onto 3 and 4 cannot clobber one."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with a fresh profile, one page; use as a context manager."""

    def __init__(self, binary: str, timeout_s: float = 90.0):
        self.deadline = time.monotonic() + timeout_s
        self.profile = tempfile.TemporaryDirectory(prefix="cxr-chromium-", ignore_cleanup_errors=True)
        to_browser_r, self._to_browser = (_above_4(fd) for fd in os.pipe())
        self._from_browser, from_browser_w = (_above_4(fd) for fd in os.pipe())

        def child_fds() -> None:  # runs in the child before exec: its fd 3 and 4 are the pipe ends
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def __enter__(self) -> Browser:
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", deviceScaleFactor=1, mobile=False, **VIEWPORT)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.deadline = time.monotonic() + 10
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the browser's own group: its renderers too
            self.proc.wait(timeout=30)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.profile.cleanup()

    # -- protocol
    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once attached) and return its result; events seen meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, event: str) -> dict[str, Any]:
        """The first event of this name (already received or next)."""
        for seen in self.events:
            if seen["method"] == event:
                return seen
        while True:
            reply = self._read_message()
            if "method" in reply:
                self.events.append(reply)
                if reply["method"] == event:
                    return reply

    # -- page
    def open(self, url: str) -> None:
        """Navigate and wait for the load event (scripts and images done)."""
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """A PNG of the viewport, or of the whole page up to `MAX_SCREENSHOT_HEIGHT` px."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "scale": 1,
                                                            "height": min(size["height"], MAX_SCREENSHOT_HEIGHT)})
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def failures(self) -> list[str]:
        """Script exceptions, console errors and failed loads seen so far, one line each."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(f"script exception: {p['exceptionDetails'].get('exception', {}).get('description')}")
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"console error: {p['entry']['text']}")
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] == "error":
                out.append(f"console.error: {p['args']}")
            elif e["method"] == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')} ({p.get('requestId')})")
        return out

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]
