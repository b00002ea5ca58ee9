"""The research views in a real headless Chromium: a word not in the prompt, a clicked pixel's self-attention,
an uploaded image explained. Screenshots go to artifacts/screenshots/ (git-ignored): look at them."""

from __future__ import annotations

import time

import pytest
from PIL import Image
from test_app_browser import SHOTS, chromium, open_app, src, wait_image_changes

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(app_server):
    with chromium() as browser:
        page = open_app(browser, app_server.url, timeout_ms=60_000)
        page.fill("#sdviz-prompt textarea", "a red circle on the left and a blue square on the right")
        page.click("#sdviz-generate")
        deadline = time.monotonic() + 120
        while "Done:" not in page.inner_text("#sdviz-progress") and time.monotonic() < deadline:
            time.sleep(0.1)
        page.wait_for_selector("#sdviz-heatmap img")
        yield page


def text_box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_typing_a_word_not_in_the_prompt_shows_its_map(page):
    box = text_box(page, "sdviz-other-words")
    box.scroll_into_view_if_needed()
    box.fill("zebra, green triangle")
    box.press("Enter")
    page.wait_for_selector("#sdviz-other-grid img")
    page.locator("#sdviz-other-grid").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "r1-words-not-in-the-prompt.png"), full_page=True)
    assert src(page, "#sdviz-other-grid")


def test_clicking_a_pixel_shows_where_it_looked(page):
    page.get_by_role("tab", name="Where a pixel looks").click()
    page.wait_for_selector("#sdviz-self-canvas img")
    page.wait_for_selector("#sdviz-self-map img")
    before = src(page, "#sdviz-self-map")
    page.locator("#sdviz-self-canvas img").click(position={"x": 60, "y": 160})
    wait_image_changes(page, "#sdviz-self-map", before)
    assert "From (" in page.inner_text("#sdviz-self-note")
    page.locator("#sdviz-self-map").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "r2-where-a-pixel-looks.png"), full_page=True)


def test_uploading_an_image_with_a_caption_shows_its_maps_and_scores(page, tmp_path):
    from sdviz.ui.panels.explain import scenes

    scene = scenes()[0]
    path = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(path)
    page.get_by_role("tab", name="Explain an image").click()
    page.locator("#sdviz-explain-image input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#sdviz-explain-image img")
    text_box(page, "sdviz-explain-caption").fill(scene.caption)
    text_box(page, "sdviz-explain-other").fill("green, zebra")
    page.click("#sdviz-explain-go")
    page.wait_for_selector("#sdviz-explain-maps img")
    page.wait_for_function("() => document.querySelector('#sdviz-explain-scores').innerText.includes('pointing')")
    page.locator("#sdviz-explain-maps").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "r3-explain-an-image.png"), full_page=True)
    assert "IoU" in page.inner_text("#sdviz-explain-scores")
