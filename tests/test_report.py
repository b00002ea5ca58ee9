"""sdviz.report: one self-contained HTML file (every image a data: URI, nothing external, user text escaped)
that renders in headless Chromium; the handout's pictures."""

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import SIZE
from PIL import Image

import sdviz
from sdviz import report

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "a red circle above a blue square"
NEGATIVE = '<b>blurry</b> & "ugly"'
WORDS = ["a", "red", "circle", "above", "blue", "square"]  # the distinct words of PROMPT
# final image, word grid, one per word, attention over time, step strip, schedule, two latent pictures,
# the step anatomy, the guidance plot, the text vectors
IMAGE_COUNT = 1 + 1 + len(WORDS) + 1 + 1 + 1 + 2 + 3


@pytest.fixture(scope="module")
def traced(sd1_pipe):
    settings = sdviz.Settings(
        PROMPT, negative_prompt=NEGATIVE, steps=3, width=SIZE, height=SIZE, seed=1, scheduler="DDIM"
    )
    image, run = sdviz.generate(sd1_pipe, settings)
    return image, run, settings


@pytest.fixture(scope="module")
def report_file(traced, tmp_path_factory):
    image, run, settings = traced
    return report.write_report(
        tmp_path_factory.mktemp("report") / "report.html", run, image, settings, extra={"Note <i>": "<i>not italic</i>"}
    )


class Refs(HTMLParser):
    """Every attribute that can load something, and every tag."""

    def __init__(self):
        super().__init__()
        self.images, self.refs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("src", "href", "srcset", "poster", "data", "action"):
            if name in attrs:
                self.refs.append(attrs[name])


def test_report_is_one_file_with_every_image_embedded_and_no_external_reference(report_file):
    text = report_file.read_text(encoding="utf-8")
    refs = Refs()
    refs.feed(text)

    assert len(refs.images) == IMAGE_COUNT
    assert all(src.startswith("data:image/png;base64,") for src in refs.images)
    assert refs.refs == refs.images  # no links, stylesheets or scripts elsewhere
    for src in refs.images:  # every data: URI is a real picture
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "script" not in refs.tags and "link" not in refs.tags and "iframe" not in refs.tags
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text


def test_report_shows_the_settings_and_explains_each_picture(report_file):
    text = " ".join(report_file.read_text(encoding="utf-8").split())
    for shown in (PROMPT, "DDIM", ">3<", ">7.5<", ">1<", "64 × 64 pixels"):  # prompt, scheduler, steps, guidance, seed
        assert shown in text
    for heading in (
        "The picture and how it was made",
        "Where each word looked",
        "Attention over time",
        "Step by step",
        "The noise schedule",
        "The latent",
    ):
        assert f"{heading}" in text, heading
    for explained in (
        "77 token vectors",
        "cross-attention",
        "predicts the noise",
        "removes part of the predicted noise",
        "4 × 8 × 8",
        "VAE decoder",
        "timestep",
        "share of the attention",
        "averaged over the attention heads, over all 3 steps and over all 16 layers",
    ):
        assert explained in text, explained


def test_report_escapes_user_text(report_file):
    text = report_file.read_text(encoding="utf-8")
    assert "<b>blurry</b>" not in text and "<i>not italic</i>" not in text
    assert "&lt;b&gt;blurry&lt;/b&gt; &amp; &quot;ugly&quot;" in text
    assert "Note &lt;i&gt;" in text


@pytest.mark.browser
def test_report_renders_in_headless_chromium_with_every_image_loaded(report_file):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: install it with `apt-get install chromium` "
            f"(never `playwright install`)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the playwright package is missing: `pip install playwright==1.65.2` "
            "(never `playwright install`; the test uses the system Chromium)"
        )
    ARTIFACTS.mkdir(exist_ok=True)
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report_file.as_uri())
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
            title = page.title()
            heading = page.inner_text("h1")
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            page.emulate_media(media="print")
            page.screenshot(path=str(ARTIFACTS / "report-print.png"), full_page=True)
            pdf = page.pdf(format="A4")
        finally:
            browser.close()

    assert len(widths) == IMAGE_COUNT and all(w > 0 for w in widths), widths
    assert PROMPT in title and PROMPT in heading
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # nothing fetched from outside
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000
    assert Image.open(ARTIFACTS / "report.png").size[1] > 2000  # the whole page, not a blank viewport


def test_handout_images_draw_the_chosen_words_and_name_the_others_when_one_is_wrong(traced):
    image, run, _ = traced
    pictures = report.handout_images(run, image, words=["circle", "Blue"])

    assert sorted(n for n in pictures if n.startswith("heatmap-")) == ["heatmap-01-circle.png", "heatmap-02-blue.png"]
    assert set(pictures) >= {
        "image.png",
        "heatmaps.png",
        "steps.png",
        "latent-rgb.png",
        "latent-channels.png",
        "schedule.png",
        "attention-over-time.png",
    }
    assert pictures["image.png"].size == (SIZE, SIZE)
    assert min(pictures["heatmap-01-circle.png"].size) >= report.MIN_SIDE  # small images are enlarged
    with pytest.raises(KeyError, match="'zebra' is not a word of the prompt; its words are: 'a', 'red'"):
        report.handout_images(run, image, words=["zebra"])


def test_a_saved_trace_makes_the_same_report(traced, tmp_path):
    image, run, settings = traced
    loaded = sdviz.TraceResult.load(run.save(tmp_path / "trace.safetensors"))

    one_word = dict(words=["circle"])  # fewer pictures: a faster test
    assert report.report_html(loaded, image, settings, **one_word) == report.report_html(
        run, image, settings, **one_word
    )


def test_an_unconditional_run_says_so_and_points_to_no_missing_section(sd1_pipe):
    image, run = sdviz.generate(sd1_pipe, sdviz.Settings("", steps=2, width=SIZE, height=SIZE))
    html = report.report_html(run, image, sdviz.Settings("", steps=2))
    assert "run was unconditional" in html
    assert "Where each word looked" not in html


def test_the_handout_takes_one_step_apart_and_shows_the_text_vectors(traced):
    image, run, settings = traced
    pictures = report.handout_images(run, image, words=["circle"], anatomy_step=0)
    assert {"step-anatomy.png", "guidance.png", "text-embedding.png"} <= set(pictures)
    page = report.report_html(run, image, settings, words=["circle"], pictures=pictures, anatomy_step=0)
    assert "Inside one step" in page and "Step 1 of 3" in page and "When does the text matter?" in page
    assert "<b>Guidance.</b>" in page and f"{77 * run.prompt_embeds.shape[-1]:,} numbers" in page
    assert report.anatomy_step_of(run, None) == 1  # by default the middle step of three
