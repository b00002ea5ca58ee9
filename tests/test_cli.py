"""`python -m sdviz`: every handout file for one prompt and for a batch; a batch goes on past bad lines;
--help; usage errors that say what to do. Runs `main()` in-process on the tiny random SD1."""

import html
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sdviz
from sdviz.__main__ import main, split_line

FAST = ["--model", "random-sd1", "--size", "64", "--steps", "2", "--scheduler", "ddim"]
PICTURES = [
    "image.png",
    "heatmaps.png",
    "steps.png",
    "latent-rgb.png",
    "latent-channels.png",
    "schedule.png",
    "attention-over-time.png",
    "step-anatomy.png",
    "guidance.png",
    "text-embedding.png",
]


def assert_handout(folder, prompt, words):
    """Every listed file is there, is what it says, and nothing else is."""
    heatmaps = [f"heatmap-{i:02d}-{w}.png" for i, w in enumerate(words, 1)]
    run = sdviz.TraceResult.load(folder / "trace.safetensors")
    pictures = [p for p in PICTURES if p != "guidance.png" or run.info.cfg]  # the guidance plot needs guidance
    files = pictures + heatmaps + ["trace.safetensors", "report.html"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name in pictures + heatmaps:
        with Image.open(folder / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 0
    assert run.prompt == prompt and run.image_size == (64, 64)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert prompt in page and page.count("<img ") == len(pictures) + len(heatmaps) and "https://" not in page
    return run


def test_one_prompt_writes_every_file(tmp_path, capsys):
    out = tmp_path / "handout"
    code = main(["a red circle above a blue square", "--out", str(out), "--seed", "4", "--guidance", "3", *FAST])

    assert code == 0
    run = assert_handout(out, "a red circle above a blue square", ["a", "red", "circle", "above", "blue", "square"])
    assert run.num_steps == 2 and run.info.scheduler == "DDIMScheduler" and run.info.guidance_scale == 3
    assert (
        "python -m sdviz 'a red circle above a blue square' --model random-sd1 --steps 2 --guidance 3 --seed 4"
        in html.unescape((out / "report.html").read_text(encoding="utf-8"))
    )
    err = capsys.readouterr().err
    assert "steps:" in err and "/2 [" in err  # the step progress bar
    assert "wrote 1 of 1 prompt to" in err


def test_a_batch_goes_on_past_bad_lines_and_reports_them_with_a_nonzero_exit(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment, then a blank line\n\n"
        "a red circle above a blue square\n"
        "a red circle --steps 0\n"  # an invalid setting
        "a blue circle --seed 3 --guidance 1\n"  # its own settings
        "a green circle --seed abc\n"  # a line that can't be read
        "a yellow square\n",
        encoding="utf-8",
    )  # lacks the word asked for: raises
    out = tmp_path / "batch"
    code = main(["--prompts", str(prompts), "--out", str(out), "--words", "circle", *FAST])

    assert code == 1
    written = ["01-a-red-circle-above-a-blue-square", "03-a-blue-circle", "index.jsonl"]  # index: sdviz.batch
    assert sorted(p.name for p in out.iterdir()) == written
    first = assert_handout(out / "01-a-red-circle-above-a-blue-square", "a red circle above a blue square", ["circle"])
    third = assert_handout(out / "03-a-blue-circle", "a blue circle", ["circle"])
    assert first.info.guidance_scale == 7.5 and third.info.guidance_scale == 1.0  # the line's own setting
    err = capsys.readouterr().err
    assert "prompts: 100%" in err and "steps:" in err  # the progress bars
    summary = err[err.index("wrote 2 of 5 prompts") :]
    assert "3 failed:" in summary
    assert "line 4 ('a red circle --steps 0'): ValueError: steps must be a whole number from 1 to 150; got 0" in summary
    assert "line 6 ('a green circle --seed abc')" in summary and "invalid int value: 'abc'" in summary
    assert "line 7 ('a yellow square')" in summary and "contains none of --words circle" in summary


def test_help_documents_every_option_with_examples(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--out",
        "--model",
        "--scheduler",
        "--steps",
        "--guidance",
        "--seed",
        "--size",
        "--negative",
        "--threads",
        "--words",
        "--prompts",
        "--device",
        "--dtype",
        "random-sd1",
        "examples:",
        "report.html",
        "trace.safetensors",
        "heatmap-NN-<word>.png",
        "exit status",
    ):
        assert option in text, option


@pytest.mark.slow
def test_python_dash_m_sdviz_runs():
    done = subprocess.run(
        [sys.executable, "-m", "sdviz", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0 and "usage: python -m sdviz" in done.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give one prompt, or --prompts FILE"),
        (["a cat", "--size", "64x"], "size must be N or WxH"),
        (["a cat", "--scheduler", "fast"], "unknown scheduler 'fast'; choose one of: DDIM"),
        (["a cat", "--steps", "0", "--model", "random-sd1"], "steps must be a whole number from 1 to 150"),
        (["   "], "the prompt is empty"),
        (["a cat", "--threads", "0", "--model", "random-sd1", "--steps", "1"], "CPU threads must be 1 or more"),
    ],
)
def test_usage_errors_exit_2_and_say_what_to_do(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_model_errors_exit_2_and_say_what_to_do(tmp_path, monkeypatch, capsys):
    assert main(["a cat", "--model", "random-sd9", "--out", str(tmp_path)]) == 2
    assert "choose one of random-sd1, random-sd2-base" in capsys.readouterr().err

    monkeypatch.setattr("sdviz.loading.TOY_MODEL_DIR", tmp_path / "no-toy-here")
    assert main(["a cat", "--out", str(tmp_path)]) == 2
    assert "no --model given and the built-in toy model is not installed" in capsys.readouterr().err

    assert main(["--prompts", str(tmp_path / "missing.txt"), "--model", "random-sd1"]) == 2
    assert "can't read the prompts file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("# only a comment\n\n", encoding="utf-8")
    assert main(["--prompts", str(tmp_path / "empty.txt"), "--model", "random-sd1"]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_a_prompts_file_line_may_carry_its_own_settings():
    assert split_line("a red circle") == ("a red circle", {})
    assert split_line("a red circle --seed 3 --scheduler 'euler a' --size 64x128 --negative \"blue, green\"") == (
        "a red circle",
        {"seed": 3, "scheduler": "Euler a", "size": (64, 128), "negative": "blue, green"},
    )
    assert split_line("a well-lit -- no, dim -- room") == ("a well-lit -- no, dim -- room", {})
    with pytest.raises(ValueError, match="unrecognized arguments: --colour"):
        split_line("a cat --colour red")


def test_anatomy_step_chooses_the_handouts_step_and_a_wrong_one_says_the_range(tmp_path, capsys):
    out = tmp_path / "anatomy"
    assert main(["a red circle", "--out", str(out), "--anatomy-step", "1", *FAST]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Step 1 of 2" in page and "Inside one step" in page and "Words become vectors" in page
    assert main(["a red circle", "--out", str(tmp_path / "bad"), "--anatomy-step", "3", *FAST]) == 1
    assert "--anatomy-step 3: this run has steps 1–2" in capsys.readouterr().err


def test_noise_writes_the_forward_diffusion_pictures_and_the_loss_curve(tmp_path, capsys):
    from sdviz.toy import world

    scene = world.sample_scenes(1, seed=2)[0]
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    out = tmp_path / "noised"
    argv = ["noise", str(tmp_path / "scene.png"), "--prompt", scene.caption, "--wrong", "a small blue triangle",
            "--timestep", "300", "--points", "3", "--model", "toy", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    expected = ["image.png", "noising.png", "noise.png", "schedule.png", "loss-vs-t.png", "loss-vs-t.csv"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected + ["trace.safetensors"])
    run = sdviz.TraceResult.load(out / "trace.safetensors")
    assert int(run.timesteps[0]) == 300 and f"training loss {run.loss:.4f}" in capsys.readouterr().err
    rows = (out / "loss-vs-t.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 4 and rows[0].startswith("timestep,alpha_bar,") and "a small blue triangle" in rows[0]
    assert main(["noise", str(tmp_path / "scene.png"), "--timestep", "1000", "--model", "toy",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "from 0 (clean) to 999" in capsys.readouterr().err
