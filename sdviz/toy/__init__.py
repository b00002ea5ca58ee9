"""The built-in toy model: a tiny Stable Diffusion trained on a synthetic shapes world.

world.py makes the data (scenes, captions, masks), train.py trains the model in `model/`, and
evaluate.py measures it through sdviz's tracing. Load it with `sdviz.load_pipeline("toy")`.
"""
