"""report.html in a real headless browser: every picture loads (naturalWidth > 0), no console errors (slow).

The browser is not a dependency. The test looks for a Chromium binary in ``$BRAINIT_CHROMIUM``, else
``~/.cache/brainit-pl/chromium/chromium``, and skips without one. One way to get it without a browser CDN (only
the npm registry): the ``@sparticuz/chromium`` package ships a brotli-compressed Chromium with the libraries it
needs::

    npm pack @sparticuz/chromium && tar xzf sparticuz-chromium-*.tgz
    mkdir -p ~/.cache/brainit-pl/chromium && cd ~/.cache/brainit-pl/chromium
    node -e 'const f=require("fs"),z=require("zlib"),p=process.argv[1];
      for (const n of ["chromium","al2023.tar"]) f.writeFileSync(n, z.brotliDecompressSync(f.readFileSync(p+n+".br")))' \
      OLDPWD/package/bin/
    chmod +x chromium && mkdir -p al2023 && tar xf al2023.tar -C al2023

(``OLDPWD``: the folder of ``npm pack``.) Libraries in an ``al2023/lib`` folder beside the binary are put on
``LD_LIBRARY_PATH``. The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
no websocket library and no driver package needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainit_pl.metrics.html import Gallery, write_html_report

pytestmark = pytest.mark.slow
CHROMIUM_ENV = "BRAINIT_CHROMIUM"
DEFAULT_CHROMIUM = Path("~/.cache/brainit-pl/chromium/chromium").expanduser()
FLAGS = ("--headless=shell", "--no-sandbox", "--no-zygote", "--single-process", "--disable-gpu")


def _chromium() -> Path:
    chosen = os.environ.get(CHROMIUM_ENV)
    for candidate in (Path(chosen) if chosen else None, DEFAULT_CHROMIUM):
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return Path(shutil.which(name))
    pytest.skip(f"no Chromium: set ${CHROMIUM_ENV} or see this file's docstring for {DEFAULT_CHROMIUM}")


class DevTools:
    """The DevTools protocol over ``--remote-debugging-pipe``: NUL-terminated JSON on fds 3 (in) and 4 (out)."""

    def __init__(self, binary: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        env = dict(os.environ)
        libs = binary.parent / "al2023" / "lib"
        if libs.is_dir():
            env["LD_LIBRARY_PATH"] = f"{libs}:{env.get('LD_LIBRARY_PATH', '')}"
        command = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen(
            ["bash", "-c", command, str(binary), *FLAGS, "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 65536)
            if not chunk:
                raise RuntimeError("the browser closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send a command, keep the events that arrive before its answer; returns its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _errors(events: list[dict]) -> list[dict]:
    """Console errors, uncaught exceptions and failed loads among the DevTools events."""
    return [
        e
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]


def test_report_renders_with_every_picture_loaded(tmp_path):
    binary = _chromium()
    rng = np.random.default_rng(0)
    for folder in ("gt", "semantic"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png"
            )
    Image.fromarray(rng.integers(0, 255, (20, 60, 3), dtype=np.uint8)).save(tmp_path / "map.png")
    gallery = Gallery(
        "subj01", tmp_path / "gt", {"semantic": tmp_path / "semantic"}, ["0.png", "1.png", "2.png"]
    )
    page = write_html_report(
        tmp_path / "report.html", title="t", galleries=[gallery], figures=[tmp_path / "map.png"]
    )

    browser = DevTools(binary)
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session)
        browser.call("Page.navigate", session, url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        script = "JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth]))"
        value = browser.call("Runtime.evaluate", session, expression=script, returnByValue=True)["result"][
            "value"
        ]
    finally:
        browser.close()
    images = json.loads(value)
    assert len(images) == 3 * 2 + 1
    assert all(complete and width > 0 for complete, width in images), images
    assert not _errors(browser.events), _errors(browser.events)
