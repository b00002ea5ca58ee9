"""The page as a teacher meets it, in headless Chromium: where Generate is on a laptop screen, Enter, Stop,
a second Generate, typed filter values, narrow screens. Screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import time

import pytest
from test_app_browser import SHOTS, chromium, open_app, set_slider

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser(app_server):
    with chromium() as b:
        yield b


def open_page(browser, app_server, width: int, height: int):
    page = open_app(browser, app_server.url, width, height, timeout_ms=60_000)
    page.wait_for_selector("#sdviz-words", state="attached")
    time.sleep(0.5)  # fonts and layout settle
    return page


def progress(page) -> str:
    return page.inner_text("#sdviz-progress")


def click(page, selector: str):
    """Click where a person would: at the element's centre on the screen, without scrolling the page."""
    box = page.locator(selector).bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def wait_for_step(page, at_least: int):
    page.wait_for_function(
        "(n) => { const m = document.querySelector('#sdviz-progress').innerText.match(/Step (\\d+) \\//);"
        " return m && +m[1] >= n; }",
        arg=at_least,
    )


def test_a_laptop_screen_shows_a_working_prompt_generate_and_the_preview_while_it_runs(browser, app_server):
    page = open_page(browser, app_server, 1366, 768)
    prompt = page.locator("#sdviz-prompt textarea").input_value()
    assert prompt.strip(), "the prompt starts empty: the first Generate would make an unconditional blob"
    button = page.locator("#sdviz-generate").bounding_box()
    assert button["y"] + button["height"] <= 768, f"Generate is below the first screen: {button}"
    caption = page.locator(".sdviz-caption").first.bounding_box()
    picture = page.locator("#sdviz-preview").bounding_box()
    assert caption["y"] + caption["height"] <= picture["y"] + 1, "the preview's caption covers its top"
    click(page, "#sdviz-generate")
    scrolls, inside = [], []
    while "Done" not in progress(page):
        scrolls.append(page.evaluate("window.scrollY"))
        box = page.locator("#sdviz-preview").bounding_box()
        inside.append(box["y"] >= 0 and box["y"] + box["height"] <= 768)
        time.sleep(0.1)
    page.screenshot(path=str(SHOTS / "c1-laptop-1366x768.png"))
    assert max(scrolls) == 0 and all(inside), "the live preview left the screen while the run went on"
    page.close()


def test_enter_in_the_prompt_generates(browser, app_server):
    page = open_page(browser, app_server, 1366, 900)
    box = page.locator("#sdviz-prompt textarea")
    box.fill("a blue square at the top")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#sdviz-progress').innerText.includes('Done')")
    assert box.input_value() == "a blue square at the top"  # no newline was added
    page.wait_for_function("() => document.querySelector('#sdviz-words').innerText.includes('square')")
    page.close()


def test_stop_says_where_it_stopped_and_keeps_the_steps_explorable(browser, app_server):
    page = open_page(browser, app_server, 1366, 900)
    steps = app_server.models.preset(app_server.name).max_steps
    page.fill("#sdviz-prompt textarea", "a red circle on the left and a blue square on the right")
    set_slider(page, "sdviz-steps", steps)
    page.evaluate("window.scrollTo(0, 0)")
    click(page, "#sdviz-generate")
    wait_for_step(page, 3)
    click(page, "#sdviz-stop")
    page.wait_for_function("() => document.querySelector('#sdviz-progress').innerText.includes('Stopped at step')")
    text = progress(page)
    stopped_at = int(text.split("Stopped at step ")[1].split(" ")[0])
    assert 3 <= stopped_at < steps and f"of {steps}" in text
    time.sleep(1.0)
    assert "Stopped at step" in progress(page), "a late update overwrote the Stop message"
    assert page.locator(".toast-body.error, [data-testid='toast-body'].error").count() == 0, "Stop showed an error"
    page.wait_for_selector("#sdviz-final img")
    page.wait_for_function("() => document.querySelector('#sdviz-words').innerText.includes('square')")
    assert "Stopped part-way" in page.inner_text("#sdviz-notes")
    page.get_by_role("tab", name="Steps").click()
    page.wait_for_function(f"() => document.querySelector('#sdviz-step-caption').innerText.includes('of {stopped_at}')")
    page.screenshot(path=str(SHOTS / "c2-stopped.png"), full_page=True)
    page.close()


def test_a_second_generate_during_a_run_says_to_press_stop_first(browser, app_server):
    page = open_page(browser, app_server, 1366, 900)
    steps = app_server.models.preset(app_server.name).max_steps
    set_slider(page, "sdviz-steps", steps)
    page.evaluate("window.scrollTo(0, 0)")
    click(page, "#sdviz-generate")
    wait_for_step(page, 2)
    click(page, "#sdviz-generate")
    page.wait_for_function("() => document.body.innerText.includes('press Stop first')")
    click(page, "#sdviz-stop")
    page.wait_for_function("() => document.querySelector('#sdviz-progress').innerText.includes('Stopped')")
    page.close()


def test_a_typed_step_and_enter_rerender_the_heatmap(browser, app_server):
    page = open_page(browser, app_server, 1366, 900)
    set_slider(page, "sdviz-steps", 6)
    page.evaluate("window.scrollTo(0, 0)")
    click(page, "#sdviz-generate")
    page.wait_for_function("() => document.querySelector('#sdviz-heatmap-caption').innerText.includes('all 6 steps')")
    box = page.locator("#sdviz-from-step input[type=number]")
    box.scroll_into_view_if_needed()
    box.fill("3")
    box.press("Enter")  # focus stays in the box: Enter alone must re-render
    page.wait_for_function(
        "() => document.querySelector('#sdviz-heatmap-caption').innerText.includes('steps 3–6 of 6')"
    )
    page.close()


def test_a_narrow_screen_keeps_every_tab_reachable_and_labels_whole(browser, app_server):
    page = open_page(browser, app_server, 420, 900)
    width = 420
    for selector in ("#sdviz-generate", "#sdviz-stop", "#sdviz-prompt"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    label = page.get_by_text("Random seed", exact=True)
    box = label.bounding_box()
    assert box["x"] + box["width"] <= width, f"'Random seed' is cut off: {box}"
    tabs = page.locator("[role=tab]")
    page.locator("[role=tablist]").first.scroll_into_view_if_needed()
    shown = [tabs.nth(i).inner_text() for i in range(tabs.count())]
    more = page.locator(".overflow-menu > button")
    hidden = more.count() and more.first.is_visible()
    if hidden:
        assert "More tabs" in more.first.evaluate("b => getComputedStyle(b, '::after').content")
        more.first.click()
        shown += page.locator(".overflow-dropdown button").all_inner_texts()
    page.screenshot(path=str(SHOTS / "c3-narrow-420.png"))
    for name in ("Words → places", "Steps", "Over time", "Compare", "How it works"):
        assert name in shown, (name, shown)
    page.close()


def test_stop_in_compare_has_the_last_word(browser, app_server):
    page = open_page(browser, app_server, 1366, 900)
    steps = app_server.models.preset(app_server.name).max_steps
    set_slider(page, "sdviz-steps", steps)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#sdviz-cmp-run").scroll_into_view_if_needed()
    click(page, "#sdviz-cmp-run")
    page.wait_for_function("() => document.querySelector('#sdviz-cmp-progress').innerText.includes('Variant 2/4')")
    click(page, "#sdviz-cmp-stop")
    page.wait_for_function("() => document.querySelector('#sdviz-cmp-progress').innerText.includes('Stopped')")
    time.sleep(1.5)  # a late progress update must not overwrite it
    text = page.inner_text("#sdviz-cmp-progress")
    assert text.startswith("Stopped after 1 of the variants"), text
    assert page.locator("#sdviz-cmp-gallery img").count() == 1  # the finished variant stays
    page.close()


def test_only_the_tab_on_screen_is_drawn_after_a_run_and_a_tab_keeps_what_you_set(browser, app_server):
    page = open_page(browser, app_server, 1366, 900)
    set_slider(page, "sdviz-steps", 6)
    page.evaluate("window.scrollTo(0, 0)")
    click(page, "#sdviz-generate")
    page.wait_for_function("() => document.querySelector('#sdviz-heatmap-caption').innerText.includes('all 6 steps')")
    time.sleep(1.0)
    assert page.locator("#sdviz-embedding img").count() == 0  # another tab: not drawn yet
    page.get_by_role("tab", name="Steps").click()
    page.wait_for_function("() => document.querySelector('#sdviz-step-caption').innerText.includes('Step 6 of 6')")
    set_slider(page, "sdviz-step", 3)
    page.wait_for_function("() => document.querySelector('#sdviz-step-caption').innerText.includes('Step 3 of 6')")
    page.get_by_role("tab", name="Words → vectors").click()
    page.wait_for_selector("#sdviz-embedding img")  # drawn when opened
    page.get_by_role("tab", name="Steps").click()
    time.sleep(1.5)
    assert "Step 3 of 6" in page.inner_text("#sdviz-step-caption")  # not redrawn: the step you chose stays
    page.close()
