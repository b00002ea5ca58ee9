"""The web app end to end in a real headless Chromium (Playwright, Debian's /usr/bin/chromium).

Screenshots go to artifacts/screenshots/ (git-ignored); look at them after a change to the layout.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"


@contextlib.contextmanager
def chromium():
    """Debian's Chromium under Playwright, with the screenshots' folder made; every browser test starts here."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: run `apt-get update && apt-get install -y chromium` "
            f"(never `playwright install`)"
        )
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_app(browser, url: str, width: int = 1440, height: int = 1000, timeout_ms: int = 30_000):
    """A new page at `url`, once the prompt box is there."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    page.wait_for_selector("#sdviz-prompt textarea")
    return page


@pytest.fixture(scope="module")
def page(app_server):
    with chromium() as browser:
        yield open_app(browser, app_server.url)


def src(page, selector: str) -> str | None:
    img = page.query_selector(f"{selector} img")
    return img.get_attribute("src") if img else None


def wait_image_changes(page, selector: str, old: str | None):
    """Wait until the image inside `selector` has a src other than `old`."""
    page.wait_for_function(
        "([sel, old]) => { const i = document.querySelector(sel); return i && i.src !== old; }",
        arg=[f"{selector} img", old],
    )


def set_slider(page, elem_id: str, value: int):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.scroll_into_view_if_needed()
    box.fill(str(value))
    box.press("Enter")


def test_generate_streams_live_previews_then_shows_the_result(page, app_server):
    steps = app_server.models.preset(app_server.name).max_steps
    page.fill("#sdviz-prompt textarea", "a red circle on the left and a blue square on the right")
    set_slider(page, "sdviz-steps", steps)
    page.click("#sdviz-generate")
    previews, deadline = set(), time.monotonic() + 120
    while time.monotonic() < deadline:
        if s := src(page, "#sdviz-preview"):
            previews.add(s)
        if "Done:" in page.inner_text("#sdviz-progress"):
            break
        time.sleep(0.05)
    page.screenshot(path=str(SHOTS / "1-generated.png"), full_page=True)
    assert "Done:" in page.inner_text("#sdviz-progress")
    assert len(previews) >= 3, f"the live preview changed only {len(previews)} times"
    page.wait_for_selector("#sdviz-final img")
    assert page.locator("#sdviz-seed-used textarea, #sdviz-seed-used input").first.input_value() == "42"
    assert "circle" in page.inner_text("#sdviz-tokens")


def test_clicking_a_word_changes_the_heatmap(page):
    page.wait_for_selector("#sdviz-heatmap img")
    page.wait_for_selector("#sdviz-grid img")
    before = src(page, "#sdviz-heatmap")
    words = page.locator("#sdviz-words label")
    assert words.count() >= 6
    target = (
        "square" if "square" not in (page.locator("#sdviz-words input:checked").get_attribute("value") or "") else "red"
    )
    page.locator("#sdviz-words label", has_text=target).first.click()
    wait_image_changes(page, "#sdviz-heatmap", before)
    page.locator("#sdviz-ask img").click(position={"x": 60, "y": 200})  # "Ask the image"
    page.wait_for_selector("#sdviz-ask-plot img")
    page.locator("#sdviz-heatmap").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "2-words.png"), full_page=True)


def test_scrubbing_steps_shows_previews_latent_channels_and_schedule(page):
    page.get_by_role("tab", name="Steps").click()
    page.wait_for_selector("#sdviz-schedule img")
    page.wait_for_selector("#sdviz-zchannels img")
    page.wait_for_selector("#sdviz-zrgb img")
    before = {sel: src(page, sel) for sel in ("#sdviz-x0", "#sdviz-schedule", "#sdviz-zchannels")}
    set_slider(page, "sdviz-step", 3)
    page.wait_for_function("() => document.querySelector('#sdviz-step-caption').innerText.includes('Step 3 of')")
    wait_image_changes(page, "#sdviz-schedule", before["#sdviz-schedule"])
    after = {sel: src(page, sel) for sel in before}
    assert all(after[sel] and after[sel] != before[sel] for sel in before), (before, after)
    page.click("#sdviz-decode")
    page.wait_for_selector("#sdviz-decoded img")
    page.locator("#sdviz-step").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "3-steps.png"), full_page=True)


def test_how_it_works_shows_the_live_shapes(page):
    page.get_by_role("tab", name="How it works").click()
    page.wait_for_function("() => document.querySelector('#sdviz-shapes').innerText.includes('[1, 77')")
    text = page.inner_text("#sdviz-shapes")
    assert "77" in text and "VAE" in text
    page.screenshot(path=str(SHOTS / "4-how.png"), full_page=True)


def test_readme_screenshot(page):
    """The page as a newcomer sees it after a run, for docs/screenshot.png (copied there by hand)."""
    page.get_by_role("tab", name="Words → places").click()
    page.wait_for_selector("#sdviz-heatmap img")
    page.evaluate("window.scrollTo(0, 0)")
    path = SHOTS / "readme.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 50_000


def test_compare_tab_runs_guidance_variants_and_the_shared_step_redraws_them(page):
    page.evaluate("window.scrollTo(0, 0)")
    page.fill("#sdviz-prompt textarea", "a red circle on the left and a blue square on the right")
    set_slider(page, "sdviz-steps", 6)
    page.get_by_role("tab", name="Compare").click()
    values = page.locator("#sdviz-cmp-values textarea, #sdviz-cmp-values input").first
    assert values.input_value() == "1, 3, 7.5, 15"
    page.locator("#sdviz-cmp-vary label", has_text="Steps").click()  # defaults follow the setting
    page.wait_for_function(
        "() => document.querySelector('#sdviz-cmp-values input, #sdviz-cmp-values textarea').value === '5, 10, 20, 40'"
    )
    page.locator("#sdviz-cmp-vary label", has_text="Guidance scale").click()
    page.wait_for_function(
        "() => document.querySelector('#sdviz-cmp-values input, #sdviz-cmp-values textarea').value === '1, 3, 7.5, 15'"
    )
    page.click("#sdviz-cmp-run")
    page.wait_for_function(
        "() => document.querySelector('#sdviz-cmp-progress').innerText.includes('Done: 4 variants')", timeout=120_000
    )
    page.wait_for_selector("#sdviz-cmp-figure img")
    assert page.locator("#sdviz-cmp-gallery img").count() == 4
    gallery_text = page.inner_text("#sdviz-cmp-gallery")
    assert "guidance 1" in gallery_text and "guidance 15" in gallery_text
    page.locator("#sdviz-cmp-figure").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "5-compare.png"), full_page=True)
    before = src(page, "#sdviz-cmp-figure")
    set_slider(page, "sdviz-cmp-step", 6)  # it opened 40 % of the way, on step 2
    wait_image_changes(page, "#sdviz-cmp-figure", before)
    before = src(page, "#sdviz-cmp-figure")
    page.locator("#sdviz-cmp-word input").click()
    page.get_by_role("option", name="circle", exact=True).click()
    wait_image_changes(page, "#sdviz-cmp-figure", before)
    page.locator("#sdviz-cmp-figure").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "6-compare-step-6-circle.png"), full_page=True)


def test_compare_tab_two_prompts_shows_both_and_switches_to_a_shared_word(page):
    page.evaluate("window.scrollTo(0, 0)")
    page.fill("#sdviz-prompt textarea", "a red circle")
    set_slider(page, "sdviz-steps", 6)
    page.get_by_role("tab", name="Compare").click()
    assert not page.locator("#sdviz-cmp-prompt-b").is_visible()
    page.locator("#sdviz-cmp-mode label", has_text="Two prompts").click()
    page.wait_for_selector("#sdviz-cmp-prompt-b textarea", state="visible")
    assert not page.locator("#sdviz-cmp-values").is_visible()  # the vary-one-setting inputs hide
    # A word picked for the other mode ("circle", by the test above) is cleared: pairs open on their changed words.
    page.wait_for_function("() => document.querySelector('#sdviz-cmp-word input').value === ''")
    page.fill("#sdviz-cmp-prompt-b textarea", "a blue circle")
    before = src(page, "#sdviz-cmp-figure")
    page.click("#sdviz-cmp-run")
    page.wait_for_function(
        "() => document.querySelector('#sdviz-cmp-progress').innerText.includes('Done: 2 variants')", timeout=120_000
    )
    wait_image_changes(page, "#sdviz-cmp-figure", before)
    assert page.locator("#sdviz-cmp-gallery img").count() == 2
    gallery_text = page.inner_text("#sdviz-cmp-gallery")
    assert "a red circle" in gallery_text and "a blue circle" in gallery_text
    word = page.locator("#sdviz-cmp-word input")
    assert word.input_value() == "changed words: red / blue"
    page.locator("#sdviz-cmp-figure").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "7-compare-pair.png"), full_page=True)
    before = src(page, "#sdviz-cmp-figure")
    word.click()
    page.get_by_role("option", name="circle", exact=True).click()
    wait_image_changes(page, "#sdviz-cmp-figure", before)
    page.screenshot(path=str(SHOTS / "8-compare-pair-circle.png"), full_page=True)
    box = page.locator("#sdviz-cmp-gallery .thumbnail-item").first.bounding_box()
    grid = page.locator("#sdviz-cmp-gallery .grid-wrap").bounding_box()
    assert box["height"] <= grid["height"], "a final image is cropped by the gallery"
    # (The x0 row is already the exact decode for the built-in model: tests/test_app_compare.py checks that
    # ticking "Decode x0 with the VAE" gives the same pictures from the cache.)
