"""The views inside the machine through gradio_client, by the keywords the README documents."""

from __future__ import annotations

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_app_api import generate

from sdviz.toy import world


def test_the_inside_endpoints_answer_by_keyword_after_a_run(client, app_server, tmp_path):
    with pytest.raises(AppError, match="Generate an image first"):
        client.predict(step=1, api_name="/anatomy")
    generate(client, app_server, "a red circle on the left and a blue square")
    formula, figure, guidance, _ = client.predict(step=2, api_name="/anatomy")
    assert formula.startswith("**Step 2 of 6**") and Image.open(figure).width > 500 and guidance
    table, embedding, similarity = client.predict(negative=False, api_name="/vectors")
    assert "77 vectors of" in table and Image.open(embedding).width > 400
    page = client.predict(page=3, api_name="/lesson")  # text, picture, counter (the button's label isn't returned)
    assert page[0].startswith("### 3.") and "3** of 9" in page[-1]
    scene = world.sample_scenes(1, seed=5)[0]
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    noised = client.predict(image=handle_file(str(tmp_path / "scene.png")), caption=scene.caption, timestep=400,
                            seed=0, model=app_server.name, api_name="/noise")  # fmt: skip
    assert "**t = 400**" in noised[0] and "Training loss" in noised[0]
    with pytest.raises(AppError, match="Pick an image first"):
        client.predict(image=None, caption="", timestep=100, seed=0, model=app_server.name, api_name="/noise")
