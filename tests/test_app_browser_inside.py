"""The views inside the machine in a real headless Chromium: the step's anatomy, words → vectors, noise an
image (move the timestep, upload a picture, sweep the loss) and the lesson. Screenshots in artifacts/screenshots/."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image
from test_app_browser import SHOTS, chromium, open_app, set_slider, src, wait_image_changes

pytestmark = pytest.mark.browser
PROMPT = "a red circle on the left and a blue square on the right"


@pytest.fixture(scope="module")
def page(app_server):
    with chromium() as browser:
        page = open_app(browser, app_server.url)
        page.fill("#sdviz-prompt textarea", PROMPT)
        set_slider(page, "sdviz-steps", 12)
        page.click("#sdviz-generate")
        page.wait_for_function("() => document.querySelector('#sdviz-progress').innerText.includes('Done:')",
                               timeout=120_000)  # fmt: skip
        yield page


def shot(page, name: str, selector: str):
    page.locator(selector).scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / name), full_page=True)


def view_shot(page, name: str, first: str, last: str):
    """The part of the page from `first` to `last`, for the README (docs/, copied there by hand)."""
    top, bottom = page.locator(first).first.bounding_box(), page.locator(last).first.bounding_box()
    scrolled = page.evaluate("window.scrollY")
    y0, y1 = top["y"] + scrolled - 10, bottom["y"] + bottom["height"] + scrolled + 10
    page.screenshot(path=str(SHOTS / name), full_page=True, clip={"x": 60, "y": y0, "width": 1320, "height": y1 - y0})


def test_the_step_anatomy_follows_the_step_slider(page):
    page.get_by_role("tab", name="Steps").click()
    page.wait_for_selector("#sdviz-anatomy img")
    page.wait_for_function("() => document.querySelector('#sdviz-anatomy-formula').innerText.includes('Step 12 of 12')")
    before = src(page, "#sdviz-anatomy")
    set_slider(page, "sdviz-step", 5)
    page.wait_for_function("() => document.querySelector('#sdviz-anatomy-formula').innerText.includes('Step 5 of 12')")
    wait_image_changes(page, "#sdviz-anatomy", before)
    text = page.inner_text("#sdviz-anatomy-formula")
    assert "Guidance." in text and "ε_uncond + s·(ε_text − ε_uncond)" in text and "x_next =" in text
    page.wait_for_selector("#sdviz-guidance img")
    shot(page, "inside-1-anatomy.png", "#sdviz-anatomy-formula")
    view_shot(page, "readme-anatomy.png", "#sdviz-anatomy-explain", "#sdviz-guidance")


def test_words_become_vectors_shows_the_embedding_and_the_similarities(page):
    page.get_by_role("tab", name="Words → vectors").click()
    page.wait_for_selector("#sdviz-embedding img")
    page.wait_for_selector("#sdviz-similarity img")
    table = page.inner_text("#sdviz-vectors-table")
    assert "77 vectors of" in table and "circle" in table
    shot(page, "inside-2-vectors.png", "#sdviz-embedding")
    view_shot(page, "readme-vectors.png", "#sdviz-embedding", "#sdviz-similarity")


def test_noise_an_image_moves_x_t_with_the_timestep_takes_an_upload_and_sweeps_the_loss(page, tmp_path):
    page.get_by_role("tab", name="Noise an image").click()
    page.click("#sdviz-noise-scene")
    page.wait_for_selector("#sdviz-noise-xt img")
    page.wait_for_function("() => document.querySelector('#sdviz-noise-status').innerText.includes('t = 500')")
    assert page.locator("#sdviz-noise-caption textarea").input_value().startswith("a ")
    before = {sel: src(page, sel) for sel in ("#sdviz-noise-xt", "#sdviz-noise-xt-decoded", "#sdviz-noise-cmp")}
    set_slider(page, "sdviz-noise-t", 900)
    page.wait_for_function("() => document.querySelector('#sdviz-noise-status').innerText.includes('t = 900')")
    for sel, old in before.items():
        wait_image_changes(page, sel, old)
    shot(page, "inside-3-noise.png", "#sdviz-noise-status")
    # Upload a picture of our own: a yellow square on grey.
    picture = np.full((96, 128, 3), 200, np.uint8)
    picture[30:70, 40:80] = (235, 195, 20)
    path = tmp_path / "mine.png"
    Image.fromarray(picture).save(path)
    before = src(page, "#sdviz-noise-fitted")
    page.locator("#sdviz-noise-image input[type=file]").set_input_files(str(path))
    wait_image_changes(page, "#sdviz-noise-fitted", before)
    page.fill("#sdviz-noise-caption textarea", "a large yellow square")  # say what the new picture shows
    page.press("#sdviz-noise-caption textarea", "Enter")
    page.wait_for_function("() => document.querySelector('#sdviz-noise-status').innerText.includes('large yellow')")
    page.fill("#sdviz-noise-wrong textarea", "a small blue circle")
    page.click("#sdviz-noise-sweep")
    page.wait_for_function("() => document.querySelector('#sdviz-noise-progress').innerText.includes('Done:')",
                           timeout=120_000)  # fmt: skip
    page.wait_for_selector("#sdviz-noise-loss img")
    assert "Mean loss over 20 timesteps" in page.inner_text("#sdviz-noise-verdict")
    shot(page, "inside-4-noise-loss.png", "#sdviz-noise-loss")
    view_shot(page, "readme-noise.png", "#sdviz-noise-image", "#sdviz-noise-loss")


def test_the_lesson_pages_through_and_opens_the_panel(page):
    page.get_by_role("tab", name="Lesson").click()
    page.wait_for_function("() => document.querySelector('#sdviz-lesson-text').innerText.includes('Words become')")
    shot(page, "inside-5-lesson-1.png", "#sdviz-lesson-text")
    seen = []
    for n in range(2, 10):
        page.click("#sdviz-lesson-next")
        page.wait_for_function(f"() => document.querySelector('#sdviz-lesson-counter').innerText.includes('{n} of')")
        seen.append(page.inner_text("#sdviz-lesson-text").splitlines()[0])
        if n == 4:
            page.wait_for_selector("#sdviz-lesson-picture img")
            time.sleep(0.3)
            shot(page, "inside-6-lesson-4.png", "#sdviz-lesson-text")
            view_shot(page, "readme-lesson.png", "#sdviz-lesson-back", "#sdviz-lesson-open")
    assert seen[-1].startswith("9.") and len(set(seen)) == 8
    page.click("#sdviz-lesson-open")  # page 9 → "Noise an image"
    page.wait_for_selector("#sdviz-noise-sweep", state="visible")
