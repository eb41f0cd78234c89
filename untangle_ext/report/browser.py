"""Headless Chromium for the report: find a browser and take a (small) screenshot of a page."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from .._io import atomic_write

PathLike = Union[str, "os.PathLike[str]"]
BROWSER_ENV = "UNTANGLE_EXT_BROWSER"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# --no-sandbox: Chromium refuses to start as root otherwise (CI containers); the pages are our own files.
# --disable-dev-shm-usage: containers often have a 64 MB /dev/shm, too small for a long page.
HEADLESS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-dev-shm-usage")


def find_browser() -> Optional[str]:
    """``$UNTANGLE_EXT_BROWSER`` if set, else the first Chromium / Chrome on PATH; None when there is none."""
    chosen = os.environ.get(BROWSER_ENV)
    if chosen:
        return chosen
    return next((path for path in map(shutil.which, BROWSER_NAMES) if path), None)


def run_headless(page: PathLike, args: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local file with extra ``args``; a missing browser is a clear error."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium or Chrome found (looked for {', '.join(BROWSER_NAMES)} on PATH and "
                                f"${BROWSER_ENV}); install one, e.g. `apt-get install chromium`")
    url = Path(page).resolve().as_uri()
    return subprocess.run([browser, *HEADLESS, *args, url], capture_output=True, text=True, timeout=timeout)


def screenshot(page: PathLike, png: PathLike, width: int = 1100, height: int = 1800, colors: int = 256) -> Path:
    """Render ``page`` headless into ``png`` (atomically), quantised to ``colors`` colours to keep it small."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "shot.png"
        result = run_headless(page, [f"--screenshot={raw}", f"--window-size={width},{height}"])
        if not raw.is_file():
            raise RuntimeError(f"the browser wrote no screenshot (exit code {result.returncode}): "
                               f"{result.stderr.strip()[-500:]}")
        with Image.open(raw) as img:
            small = img.convert("RGB").quantize(colors)
    return atomic_write(png, lambda f: small.save(f, format="PNG", optimize=True))
