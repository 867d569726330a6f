"""Find and drive a headless Chromium for the HTML report tests.

`require_chromium()` fails the test (never skips) with the command that installs it;
`dump_dom()` returns the DOM as Chromium rendered it; `screenshot()` writes a PNG.
Each run gets a fresh profile directory and no network access beyond the file it loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from processes import run_process

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "/usr/bin/chromium-browser", "/snap/bin/chromium")
INSTALL_HINT = (
    "headless Chromium is required to test the HTML report and none was found "
    f"(looked for {', '.join(CANDIDATES)}, or $LORA_DOCTOR_CHROMIUM). Install it with: "
    "`scripts/ensure-chromium.sh` (runs `apt-get update && apt-get install -y chromium` as root), "
    "or point LORA_DOCTOR_CHROMIUM at a Chromium/Chrome binary."
)
# No GPU, no sandbox (root in a container), nothing fetched or synced in the background.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--disable-breakpad",
    "--hide-scrollbars",
    "--mute-audio",
    "--force-device-scale-factor=1",
    "--allow-file-access-from-files",
)


def find_chromium() -> str | None:
    """Path to a Chromium binary, or None."""
    override = os.environ.get("LORA_DOCTOR_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def require_chromium() -> str:
    """The Chromium binary; fails the calling test with install instructions when there is none."""
    path = find_chromium()
    if path is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


def run_chromium(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium once on `url` with a fresh profile; raise with its stderr on failure."""
    binary = require_chromium()
    with tempfile.TemporaryDirectory(prefix="lora-doctor-chromium-") as profile:
        command = [binary, *FLAGS, f"--user-data-dir={profile}", *args, url]
        env = dict(os.environ, HOME=profile)  # keep Chromium's dot-directories out of the real home
        done = run_process(command, timeout=timeout, env=env)
    if done.returncode != 0:
        raise AssertionError(
            f"chromium exited {done.returncode}: {' '.join(command)}\n--- stderr ---\n{done.stderr[-4000:]}"
        )
    return done


def dump_dom(html_path: Path, timeout: float = 120) -> str:
    """The document as Chromium rendered it (`--dump-dom`)."""
    done = run_chromium(Path(html_path).resolve().as_uri(), "--dump-dom", timeout=timeout)
    return done.stdout


def screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 2000, timeout: float = 120) -> Path:
    """A `width`×`height` PNG of the page's top, as Chromium renders it."""
    png_path = Path(png_path).resolve()
    png_path.unlink(missing_ok=True)
    done = run_chromium(
        Path(html_path).resolve().as_uri(),
        f"--screenshot={png_path}",
        f"--window-size={width},{height}",
        timeout=timeout,
    )
    if not png_path.exists():
        raise AssertionError(f"chromium wrote no screenshot at {png_path}\n--- stderr ---\n{done.stderr[-4000:]}")
    return png_path
