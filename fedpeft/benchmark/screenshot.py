"""Render an HTML report to PNG with headless Chromium, to look at it the way a user would.

    python -m fedpeft.benchmark.screenshot workspace/ianvs/fedllm-peft-medquad/report.html out.png

Needs a Chromium binary (Debian: ``apt-get install chromium``); :func:`find_chromium` returns
None when there is none, so tests can skip.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or None."""
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def screenshot(html: str | Path, png: str | Path, width: int = 1400, height: int = 4000, timeout: float = 120) -> Path:
    """Render ``html`` (a file) into ``png`` at ``width`` x ``height`` CSS pixels.

    Raises:
        FileNotFoundError: if no Chromium is installed or ``html`` does not exist.
        RuntimeError: if Chromium fails or writes no image.
    """
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(CANDIDATES)}); apt-get install chromium")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedpeft-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--allow-file-access-from-files", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png}", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=4000)
    args = p.parse_args(argv)
    print(screenshot(args.html, args.png, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
