"""Driving JupyterLab in Debian's chromium (playwright), for the browser tests.

:class:`Lab` starts ``jupyter lab`` on 127.0.0.1 with a random free port and a random token,
over a temporary copy of the notebooks (running them never touches a tracked file), with user
settings that render every cell (no virtual scrolling, so the test sees every output) and fetch
no news. It is stopped through its own process group, also when a test fails.
:func:`run_notebook` opens one notebook, runs all cells from the menu, waits for the kernel to
finish, saves it, and reports what the page shows.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"

SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab:
    """A JupyterLab server over ``root``; use as a context manager."""

    def __init__(self, root: Path, settings_dir: Path) -> None:
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        for name, value in SETTINGS.items():
            plugin, file = name.rsplit("/", 1)
            (settings_dir / plugin).mkdir(parents=True, exist_ok=True)
            (settings_dir / plugin / file).write_text(json.dumps(value))
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
            "JUPYTER_PLATFORM_DIRS": "1",
            # A fresh workspace: Lab would otherwise reopen the tabs of an earlier session.
            "JUPYTERLAB_WORKSPACES_DIR": str(settings_dir / "workspaces"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Lab:
        argv = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.news_url=",
            "--ServerApp.allow_root=True",
        ]
        self.log = (self.root / "lab.log").open("wb")
        self.proc = subprocess.Popen(
            argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {(self.root / 'lab.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError("jupyter lab did not answer within 90 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def shutdown_kernels(self) -> int:
        """End every session and its kernel (a notebook left running must not slow or confuse
        the next one); returns how many were ended."""
        base = f"{self.url}/api/sessions"
        with urllib.request.urlopen(f"{base}?token={self.token}", timeout=10) as r:
            sessions = json.loads(r.read())
        for session in sessions:
            request = urllib.request.Request(
                f"{base}/{session['id']}?token={self.token}", method="DELETE"
            )
            urllib.request.urlopen(request, timeout=30).close()
        return len(sessions)

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"


@dataclass
class NotebookRun:
    """What the page showed after running one notebook."""

    name: str
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    figures: int = 0
    undrawn: list[int] = field(default_factory=list)
    maths: int = 0
    raw_dollars: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unrun: int = 0


def block_network(page: Any) -> list[str]:
    """Abort every request that does not go to this machine: a CDN script fails loudly.
    Returns the list the aborted URLs are appended to."""
    blocked: list[str] = []

    def route(r: Any) -> None:
        url = r.request.url
        host = url.split("/")[2].split(":")[0] if url.startswith("http") else ""
        if url.startswith(("file:", "data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    page.route("**/*", route)
    return blocked


def run_notebook(page: Any, lab: Lab, name: str, timeout_s: float = 600) -> NotebookRun:
    """Open ``name``, run all cells, wait until the kernel is idle, save; report."""
    result = NotebookRun(name)
    page.on("console", lambda msg: result.console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: result.console.append(f"pageerror: {err}"))
    start = time.monotonic()
    page.goto(lab.notebook_url(name))
    page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
    page.wait_for_timeout(1500)
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and "Select Kernel" in dialog.first.inner_text():
        dialog.get_by_role("button", name="Select", exact=True).click()
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
        timeout=120_000
    )
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.monotonic() + timeout_s
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    idle = panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    time.sleep(2)
    quiet = 0
    while time.monotonic() < deadline:
        prompts = panel.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        busy = any("*" in p for p in prompts)
        done = all(any(ch.isdigit() for ch in p) for p in prompts)
        # An error stops "Run All": the kernel goes idle with cells left unrun.
        quiet = quiet + 1 if not busy and idle.count() else 0
        if (done and not busy) or quiet >= 5:
            break
        time.sleep(1)
    else:
        raise TimeoutError(f"{name} did not finish within {timeout_s} s; {_running(panel)}")
    result.unrun = sum(not any(ch.isdigit() for ch in p) for p in prompts)
    page.wait_for_timeout(1500)  # last outputs and widget views render
    result.seconds = time.monotonic() - start
    page = panel  # every query below looks at this notebook only
    for text in page.locator(".jp-OutputArea-output[data-mime-type*='stderr']").all_inner_texts():
        if "Traceback" in text or "Error" in text.split("\n")[0]:
            result.errors.append(text[:2000])
    plots = page.locator(".js-plotly-plot")
    result.figures = plots.count()
    for i in range(result.figures):
        drawn = plots.nth(i).evaluate(
            "el => !!el.querySelector('svg.main-svg') && Array.isArray(el.data) && el.data.length > 0"
        )
        if not drawn:
            result.undrawn.append(i)
    result.maths = page.locator(".jp-MarkdownCell mjx-container").count()
    for text in page.locator(".jp-MarkdownCell .jp-RenderedMarkdown").all_inner_texts():
        if text.count("$") >= 2:
            result.raw_dollars.append(text[:200])
    panel.page.keyboard.press("Control+s")
    panel.page.wait_for_timeout(1000)
    return result


def _running(panel: Any) -> str:
    """Which code cell was running, by index and first line, and how many had not run."""
    cells = panel.locator(".jp-CodeCell")
    prompts = cells.locator(".jp-InputPrompt").all_inner_texts()
    # Lab marks the running cell and every cell queued after it with "[*]".
    waiting = sum(not any(ch.isdigit() for ch in p) for p in prompts)
    for i, prompt in enumerate(prompts):
        if "*" in prompt:
            source = cells.nth(i).locator(".jp-InputArea-editor").inner_text().strip()
            first = source.splitlines()[0] if source else ""
            return f"code cell {i} was running ({first!r}), {waiting - 1} more had not run"
    return f"no cell was running, {waiting} had not run"


def copy_notebooks(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(src.glob("*.ipynb")):
        shutil.copy(path, dst / path.name)
        names.append(path.name)
    return names
