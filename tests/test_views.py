"""Small view helpers of the app that need no server."""

from conftest import SIZE

import sdviz
from sdviz.ui import views


def test_the_first_heatmap_is_the_strongest_content_word(sd1_pipe):
    _, run = sdviz.generate(sd1_pipe, sdviz.Settings("a red circle on the left", steps=2, width=SIZE, height=SIZE))
    shares = run.word_shares().mean(0)
    content = {w.text: shares[w.index] for w in run.words if w.text not in ("a", "on", "the")}
    assert views.strongest_word(run) == max(content, key=content.get)
    _, only_a = sdviz.generate(sd1_pipe, sdviz.Settings("a", steps=2, width=SIZE, height=SIZE))
    assert views.strongest_word(only_a) == "a"


def test_the_built_in_model_shows_what_it_can_draw():
    note = views.model_note(sdviz.PRESETS["toy"])
    for word in ("red", "green", "blue", "yellow", "circle", "square", "triangle", "small", "large", "on the left"):
        assert word in note
    assert views.model_note(sdviz.PRESETS["sd15"]) == ""
