"""The playground at ``/ui`` in a real browser (headless Chromium from Debian, driven by Playwright for Python),
on the default model served on a loopback port, by each engine: the transformers engine here, the vLLM engine in
its own environment (``.ci/vllm`` runs the ``vllm``-marked cases). The README's screenshot is written here
(``docs/playground.png``, refreshed when ``SEERIGHT_SCREENSHOT=1``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_image

from seeright.eval import pope
from seeright.service.settings import Settings
from seeright.tools.loadtest import local_server

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the [test] extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (.ci/run installs Debian's: apt-get install -y chromium)")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "playground.png"
ENGINES = ["transformers", pytest.param("vllm", marks=[
    pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")])]


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory):
    images = tmp_path_factory.mktemp("pope-images")
    for i, name in enumerate(sorted({q.image for q in pope.builtin_questions("random")[:6]})):
        make_image(i, (64, 64)).save(images / name)
    settings = Settings(engine=request.param, allowed_image_dir=images, eval_dir=tmp_path_factory.mktemp("evals"),
                        vllm_max_model_len=1024)
    with local_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.console_errors = []  # type: ignore[attr-defined]
    page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
    page.on("pageerror", lambda exc: page.console_errors.append(str(exc)))
    page.goto(f"{server}/ui")
    page.wait_for_selector(".column .methods label")
    yield page
    page.close()


def test_page_loads_with_no_console_errors(page):
    assert page.locator(".column").count() == 2
    assert page.locator("#examples img").count() == 3
    assert page.locator("#model").inner_text() == Settings().name
    page.wait_for_timeout(300)
    assert page.console_errors == []


def test_plain_against_var_shows_two_answers_and_an_overlay(page):
    page.locator("#examples img").first.click()
    page.wait_for_function("document.querySelector('#preview').src.startsWith('data:image')")
    assert page.locator(".column").nth(1).locator(".column-title").inner_text() == "2. var"
    page.fill("#question", "Describe the image.")
    page.locator("#run").click()
    page.wait_for_selector(".column:nth-child(2) .answer .tok", timeout=60_000)
    page.wait_for_selector(".column:nth-child(1) .answer .tok", timeout=60_000)
    answers = [page.locator(".column").nth(i).locator(".answer").get_attribute("data-text") for i in range(2)]
    assert all(answers)
    token = page.locator(".column").nth(1).locator(".answer .tok").nth(3)
    token.hover()
    overlay = page.locator(".column").nth(1).locator("canvas.overlay")
    assert overlay.get_attribute("data-overlay") == "attention" and overlay.get_attribute("data-token") == "3"
    opaque = page.evaluate("""(canvas) => {
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0; for (let i = 3; i < data.length; i += 4) n += data[i] > 0; return [n, canvas.width * canvas.height];
    }""", overlay.element_handle())
    assert opaque[1] == 16 and opaque[0] > 0  # the 4 x 4 patch grid of the default model, drawn
    assert "ms" in page.locator(".column").nth(1).locator(".stats").inner_text()
    assert page.console_errors == []
    if os.environ.get("SEERIGHT_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_a_bad_image_shows_the_servers_message(page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.querySelector('#preview').src.startsWith('data:')")
    page.locator("#run").click()
    error = page.locator(".column").first.locator(".column-error")
    error.wait_for(state="visible", timeout=30_000)
    assert "messages[0].content[0].image_url" in error.inner_text()


def test_an_evaluation_started_from_the_page_shows_progress_then_metrics(page):
    page.locator("#tab-evaluations").click()
    page.fill("input[name=limit]", "6")
    page.fill("input[name=batch_size]", "2")
    page.locator("#eval-form button[type=submit]").click()
    row = page.locator("tr[data-job]").first
    row.wait_for(timeout=30_000)
    assert "/ 6" in row.locator(".progress").inner_text()
    page.wait_for_selector("tr[data-status=completed]", timeout=120_000)
    row = page.locator("tr[data-status=completed]").first
    assert row.locator(".progress").inner_text() == "6 / 6"
    assert "acc" in row.locator(".metrics").inner_text()
    row.locator("img.plot").wait_for(timeout=10_000)
    assert page.console_errors == []


def test_gift_and_carve_columns_offer_their_own_overlays(page):
    page.locator("#examples img").nth(1).click()
    page.wait_for_function("document.querySelector('#preview').src.startsWith('data:image')")
    first = page.locator(".column").first
    for name in ("gift", "carve"):
        first.locator(f".methods input[value={name}]").check()
    page.locator("#run").click()
    first.locator(".overlay-choice input[value=saliency]").wait_for(timeout=60_000)
    first.locator(".overlay-choice input[value=saliency]").check()
    assert first.locator("canvas.overlay").get_attribute("data-overlay") == "saliency"
    first.locator(".overlay-choice input[value=mask]").check()
    assert first.locator("canvas.overlay").get_attribute("data-overlay") == "mask"
    assert page.console_errors == []


def test_a_vif_column_shows_its_relay_tokens_for_the_next_agent(page):
    page.locator("#examples img").first.click()
    page.wait_for_function("document.querySelector('#preview').src.startsWith('data:image')")
    first = page.locator(".column").first
    first.locator(".methods input[value=vif]").check()
    page.locator("#run").click()
    first.locator(".signals").wait_for(timeout=60_000)
    assert "ViF relay tokens" in first.locator(".signals").inner_text()
    assert "interventions.vif.relay" in first.locator(".signals").inner_text()
    first.locator(".overlay-choice input[value=relay]").check()
    assert first.locator("canvas.overlay").get_attribute("data-overlay") == "relay"
    assert page.console_errors == []


def test_the_page_asks_for_the_api_key_when_the_server_has_keys(browser):
    with local_server(Settings(api_keys=["secret-key"])) as url:
        page = browser.new_page()
        page.goto(f"{url}/ui")
        page.wait_for_selector("#banner:not([hidden])")
        assert "API key" in page.locator("#banner").inner_text() and page.locator(".column").count() == 0
        page.fill("#api-key", "secret-key")
        page.locator("#api-key").dispatch_event("change")
        page.wait_for_selector(".column .methods label")
        assert page.locator("#banner").is_hidden()
        page.close()
