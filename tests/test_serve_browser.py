"""The web page of `mmlm serve` in a real headless browser (Chromium driven by Playwright).

Skipped when Playwright or a Chromium binary is missing (`apt-get install chromium`,
`pip install playwright`; Playwright's own browser download is not needed: the system
Chromium is launched by path, or the one named by MMLM_CHROMIUM).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240  # compiling the tiny model's programs on a busy 2-core host
ANSWER_TIMEOUT_MS = 120_000


def _chromium() -> str | None:
    for candidate in (os.environ.get("MMLM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mmlm serve` on a tiny random Matryoshka checkpoint (budgets 1 and 4), on 127.0.0.1."""
    if _chromium() is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set MMLM_CHROMIUM)")
    from mmlm.checkpoint import save_model
    from mmlm.config_utils import load_config
    from mmlm.infer.random_model import random_params
    from mmlm.models.config import model_config_from_dict

    root = tmp_path_factory.mktemp("browser")
    config = load_config(str(REPO / "configs" / "tiny.py"))
    save_model(str(root / "ckpt"), random_params(model_config_from_dict(config.model), seed=3), config)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "photo.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mmlm.cli", "serve", "--checkpoint", str(root / "ckpt"),
                             "--host", "127.0.0.1", "--port", str(port), "--max_batch", "2"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{(root / 'server.log').read_text()}")
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready in {STARTUP_TIMEOUT_S} s:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield base, root
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 820})
            pg.goto(server[0] + "/")
            yield pg
        finally:
            browser.close()


def test_page_lists_the_model_and_its_budgets(server, page):
    sync_api.expect(page.locator("#model-name")).to_contain_text("budgets 1, 4 or auto", timeout=30_000)
    assert page.locator("#budget").get_attribute("max") == "2"  # budgets 1 and 4, then auto: positions 0-2
    assert page.locator("#ask").is_disabled()  # no media, no question yet


def test_asking_streams_the_api_answer_and_draws_the_compression_map(server, page):
    base, root = server
    page.set_input_files("#media-input", str(root / "photo.png"))
    sync_api.expect(page.locator("#preview-media")).to_be_visible()
    page.fill("#question", "What color is the circle?")
    sync_api.expect(page.locator("#map")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    # The slider moves to budget 4: the map is recomputed with four panels.
    page.locator("#budget").fill("1")
    page.locator("#budget").dispatch_event("change")
    sync_api.expect(page.locator("#budget-value")).to_have_text("4 tokens")
    sync_api.expect(page.locator("#map")).to_have_attribute("data-budget", "4", timeout=ANSWER_TIMEOUT_MS)
    assert page.locator("#map").get_attribute("src").startswith("data:image/png;base64,")

    page.click("#ask")
    sync_api.expect(page.locator("#answer")).to_have_attribute("data-done", "true", timeout=ANSWER_TIMEOUT_MS)
    assert page.inner_text("#error") == ""
    shown = page.locator("#answer").text_content()
    # The same request, not streamed, through the API: the page shows exactly that answer.
    import base64

    url = "data:image/png;base64," + base64.b64encode((root / "photo.png").read_bytes()).decode()
    reply = _post_json(base + "/v1/chat/completions", {
        "model": json.loads(_get(base + "/v1/models")[1])["data"][0]["id"], "max_tokens": 128, "temperature": 0,
        "num_vision_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "What color is the circle?"}]}]})
    assert shown == reply["choices"][0]["message"]["content"]
    assert page.locator("#history li").count() == 1
    assert "4 vision tokens" in page.inner_text("#stats")
    page.screenshot(path=str(root / "page.png"), full_page=True)


def test_the_auto_position_asks_with_auto_and_names_the_budget_the_cascade_chose(server, page):
    base, root = server
    page.set_input_files("#media-input", str(root / "photo.png"))
    page.fill("#question", "What shape is left of the circle?")
    page.locator("#budget").fill("2")
    page.locator("#budget").dispatch_event("input")
    page.locator("#budget").dispatch_event("change")
    sync_api.expect(page.locator("#budget-value")).to_have_text("auto")
    page.click("#ask")
    sync_api.expect(page.locator("#answer")).to_have_attribute("data-done", "true", timeout=ANSWER_TIMEOUT_MS)
    assert page.inner_text("#error") == ""
    import base64

    url = "data:image/png;base64," + base64.b64encode((root / "photo.png").read_bytes()).decode()
    reply = _post_json(base + "/v1/chat/completions", {
        "max_tokens": 128, "temperature": 0, "num_vision_tokens": "auto",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "What shape is left of the circle?"}]}]})
    used = reply["num_vision_tokens"]
    assert page.locator("#answer").text_content() == reply["choices"][0]["message"]["content"]
    assert f"{used} vision token" in page.inner_text("#stats") and "chosen by auto" in page.inner_text("#stats")


def test_a_broken_upload_shows_the_server_error_and_the_page_keeps_working(server, page):
    base, root = server
    page.set_input_files("#media-input", str(root / "broken.png"))
    page.fill("#question", "What shape is it?")
    page.click("#ask")
    sync_api.expect(page.locator("#error")).not_to_have_text("", timeout=ANSWER_TIMEOUT_MS)
    assert "image" in page.inner_text("#error").lower()
    assert _get(base + "/health")[0] == 200
    # A good image again: answered.
    page.set_input_files("#media-input", str(root / "photo.png"))
    page.click("#ask")
    sync_api.expect(page.locator("#answer")).to_have_attribute("data-done", "true", timeout=ANSWER_TIMEOUT_MS)
    assert page.inner_text("#error") == ""
