"""A real headless Chromium for tests, driven over the Chrome DevTools protocol (CDP).

No browser-automation package: the protocol is JSON over one websocket, spoken here with aiohttp's
client (already installed with faust). `ensure_chromium()` finds the browser (`PLAYREC_CHROMIUM`, or
`chromium` / `chromium-browser` / `google-chrome` on PATH) and, when there is none on a Debian-like
system where we are root (CI), installs Debian's `chromium` package with apt-get; otherwise it says
what to install.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from .workers import wait_for

#: Executables tried, in order, when PLAYREC_CHROMIUM is not set.
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: What apt-get installs when no browser is found (the fonts: text in screenshots).
APT_PACKAGES = ("chromium", "fonts-dejavu-core")
APT_TIMEOUT_S = 900
#: Seconds one protocol command may take.
COMMAND_TIMEOUT_S = 30.0


class BrowserError(RuntimeError):
    """No browser, or the browser failed (with what it said)."""


def find_chromium() -> str | None:
    """The browser to run: $PLAYREC_CHROMIUM, else the first of CANDIDATES on PATH, else None."""
    configured = os.environ.get("PLAYREC_CHROMIUM")
    if configured:
        if not os.access(configured, os.X_OK):
            raise BrowserError(f"PLAYREC_CHROMIUM={configured} is not an executable")
        return configured
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    """The browser's path, installing Debian's `chromium` package first when there is none (as root,
    where apt-get exists: CI); raises BrowserError saying what to do when that is not possible."""
    found = find_chromium()
    if found:
        return found
    advice = (
        "the console test needs a Chromium: `apt-get install chromium` (Debian), `apt-get install "
        "chromium-browser` (Ubuntu), or point PLAYREC_CHROMIUM at a Chrome/Chromium executable"
    )
    if shutil.which("apt-get") is None:
        raise BrowserError(f"no Chromium on PATH and no apt-get to install one: {advice}")
    if os.geteuid() != 0:
        raise BrowserError(f"no Chromium on PATH, and installing it needs root: {advice}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    output = []
    for step in (install, ["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], install):
        try:
            done = subprocess.run(
                step, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=APT_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise BrowserError(f"`{' '.join(step)}` took over {APT_TIMEOUT_S} s: {advice}") from None
        output.append(done.stdout[-2000:] + done.stderr[-2000:])
        if step is install and done.returncode == 0:
            break  # installed (the first try works when the package lists are there already)
    found = find_chromium()
    if found is None:
        raise BrowserError(f"apt-get could not install chromium:\n{output[-1]}\n{advice}")
    return found


class Browser:
    """One headless Chromium with one page, driven synchronously (each call runs the protocol's asyncio
    client to completion on the browser's own event loop). Console errors, uncaught exceptions, failed
    loads and every request URL the page makes are recorded (`problems`, `requests`)."""

    def __init__(self, executable: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.width, self.height = width, height
        args = [
            executable,
            "--headless=new",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
        self.log_path = profile / "chromium.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.loop = asyncio.new_event_loop()
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            self._run(self._connect(self._page_socket(profile / "DevToolsActivePort")))
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
        except BaseException:
            self.close()
            raise

    # -- protocol ------------------------------------------------------------------------------
    def _page_socket(self, port_file: Path, deadline_s: float = 30.0) -> str:
        """The websocket URL of the browser's first page, once it listens (it writes DevToolsActivePort)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}:\n{self.tail()}")
            lines = port_file.read_text().split("\n") if port_file.exists() else []
            if len(lines) >= 2 and lines[0].strip().isdigit():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{lines[0].strip()}/json/list", timeout=5) as r:
                        targets = json.loads(r.read())
                except OSError:
                    targets = []
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise BrowserError(f"chromium did not open its DevTools port within {deadline_s:.0f} s:\n{self.tail()}")

    async def _connect(self, url: str) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(url, max_msg_size=64 * 1024 * 1024)

    def _run(self, coro: Any, timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))

    async def _command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._ws is not None
        self._next_id += 1
        ident = self._next_id
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await self._ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"the DevTools connection closed ({message.type.name}) during {method}")
            body = json.loads(message.data)
            if body.get("id") == ident:
                if "error" in body:
                    raise BrowserError(f"{method}: {body['error']}")
                return body.get("result", {})
            if "method" in body:
                self.events.append(body)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One protocol command; returns its result (events that arrive meanwhile are recorded)."""
        return self._run(self._command(method, params))

    # -- the page ------------------------------------------------------------------------------
    def navigate(self, url: str, deadline_s: float = 30.0) -> None:
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", deadline_s, f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def wait_for(self, expression: str, deadline_s: float, what: str, interval_s: float = 0.2) -> Any:
        """Evaluate `expression` until it is truthy (then return it) or the deadline passes (then fail)."""
        return wait_for(lambda: self.evaluate(expression), deadline_s, what, interval_s)

    def focus(self, selector: str) -> None:
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "if (!e) return false; e.focus(); if ('value' in e) e.value = ''; return true; })()"
        )
        if not found:
            raise BrowserError(f"no element {selector}")

    def type(self, selector: str, text: str) -> None:
        """Focus `selector`, clear it and type `text` as the keyboard would insert it."""
        self.focus(selector)
        self.send("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                nativeVirtualKeyCode=13,
                text="\r" if kind == "keyDown" else "",
            )

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of `selector` (scrolled into view first)."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null; "
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
            "return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"no element {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path, full_page: bool = False) -> bytes:
        """A PNG of the viewport (or the whole page), written to `path`; returns its bytes."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            height = self.evaluate("document.documentElement.scrollHeight")
            params.update(
                captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1}
            )
        else:
            self.evaluate("window.scrollTo(0, 0)")
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    # -- what happened -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors, browser log errors (CSP violations among them) and failed
        loads, as one line each."""
        out = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(
                    "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log: {entry.get('text')} ({entry.get('url', '')})")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                out.append(f"load failed: {params.get('errorText')} ({params.get('type')})")
        return out

    def requests(self) -> list[str]:
        """Every URL the page requested."""
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        try:
            if self._ws is not None and not self._ws.closed:
                self._run(self._ws.close(), 5)
            if self._session is not None:
                self._run(self._session.close(), 5)
        except (BrowserError, OSError, asyncio.TimeoutError):
            pass  # the process is stopped below either way
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.loop.close()
            self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
