"""The README's picture of the `mmlm serve` web page: a real headless Chromium, a real answer.

    python experiments/serving/screenshot.py --workdir workdirs/demo [--out experiments/serving/page.png]

Starts `mmlm serve` on the model (127.0.0.1, a free port), opens the page in Chromium (the system
binary, driven by Playwright: `apt-get install chromium`, `pip install playwright`), uploads a
held-out synthetic shapes image, asks a question, waits for the streamed answer and the
compression map, saves a screenshot, then stops the server with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {timeout_s:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="training workdir of the model to serve (e.g. the demo's)")
    p.add_argument("--out", default=str(REPO / "experiments" / "serving" / "page.png"), help="PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--question", default="What shape is the purple object?", help="the question typed into the page")
    p.add_argument("--index", type=int, default=3, help="which held-out synthetic scene to upload")
    args = p.parse_args()
    if os.path.exists(args.out) and not args.overwrite:
        print(f"screenshot: error: {args.out!r} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshot: error: no Chromium binary (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import expect, sync_playwright

    from mmlm.checkpoint import load_config_json
    from mmlm.data.synth import scene

    config = load_config_json(args.workdir)
    image, _ = scene(config.synthetic.kind, args.index, config.synthetic.seed, "val", config.data.image_size)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "scene.png"
        image.resize((image.width * 4, image.height * 4)).save(photo)  # the page shows it large enough to see
        proc = subprocess.Popen([sys.executable, "-m", "mmlm.cli", "serve", "--workdir", args.workdir,
                                 "--port", str(port)], cwd=REPO)
        try:
            _wait_ready(base, proc, 600)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1200, "height": 760})
                page.goto(base + "/")
                expect(page.locator("#model-name")).not_to_have_text("connecting…", timeout=30_000)
                page.set_input_files("#media-input", str(photo))
                expect(page.locator("#map")).to_be_visible(timeout=120_000)
                page.fill("#question", args.question)
                page.click("#ask")
                expect(page.locator("#answer")).to_have_attribute("data-done", "true", timeout=120_000)
                answer = page.locator("#answer").text_content()
                tmp_out = Path(tmp) / "page.png"
                page.screenshot(path=str(tmp_out), full_page=True)
                browser.close()
            shutil.move(str(tmp_out), args.out)
            print(f"Q: {args.question}  A: {answer}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
