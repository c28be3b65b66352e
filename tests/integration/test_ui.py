"""`shitate ui` in a real headless Chromium on the tiny model: check data, train a few steps, chat."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("SHITATE_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file() and not shutil.which("chromium"),
                                reason="no Chromium at /usr/bin/chromium (apt install chromium) for the browser test")

from test_train import make_recipe  # noqa: E402


def test_check_train_and_chat_in_a_browser(tmp_path, tiny_model):
    from shitate.serve.ui import build, launch

    recipe = make_recipe(tmp_path, tiny_model)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build(str(tiny_model), None, [recipe], runs_dir=tmp_path / "runs")
    launch(app, port=port, block=False)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            # Data: upload the training file and read data check's verdict.
            page.locator("#data-file input[type=file]").set_input_files(str(tmp_path / "train.jsonl"))
            page.locator("#check").click()
            page.locator("#check-result").get_by_text("24 valid conversations, 0 errors").wait_for(timeout=60_000)
            # Train: three steps of the recipe, with the live progress the run folder reports.
            page.get_by_role("tab", name="学習 / Train").click()
            # The tab is drawn and its timer ticking before we type: a field filled while it mounts can be reset.
            page.locator("#progress").get_by_text("Not started").wait_for(timeout=60_000)
            page.locator("#steps input").fill("3")
            page.locator("#steps input").press("Tab")  # commits the number before the click reads it
            playwright.expect(page.locator("#steps input")).to_have_value("3")
            page.locator("#train").click()
            page.locator("#started").get_by_text("at most 3 steps").wait_for(timeout=60_000)
            # Wait for the run to end either way, so a failure shows what the page said rather than a timeout.
            finished = page.locator("#progress").get_by_text(re.compile("完了 / Done|エラー / Error"))
            finished.wait_for(timeout=180_000)
            assert "完了 / Done: 3 steps" in finished.inner_text(), finished.inner_text()
            # Chat: base and tuned answer side by side.
            page.get_by_role("tab", name="チャット / Chat").click()
            page.locator("#message textarea").fill("なんで空は青いの?")
            page.locator("#send").click()
            for chat in ("#base-chat", "#tuned-chat"):
                page.locator(chat).get_by_text("なんで空は青いの?").wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ui.png").stat().st_size > 10_000
