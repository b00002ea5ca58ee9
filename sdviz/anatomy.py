"""One denoising step taken apart, in numbers: the U-Net's two predictions, guidance, the clean guess x0, and
how the scheduler turns x_t into the next latent. Read from a TraceResult alone (no model needed).

    a = sdviz.anatomy.step_anatomy(run, 9)            # step 10 of the run
    a.guided_by_formula                               # ε_uncond + s·(ε_text − ε_uncond)   [C, h, w]
    a.mix()                                           # (keep, pull, explained): x_next ≈ keep·x_t + pull·x0
    print(sdviz.anatomy.explain(a))                   # the step's formulas filled in with its own numbers
    sdviz.anatomy.guidance_contribution(run)          # [S] ‖ε_text − ε_uncond‖ / ‖ε_uncond‖: when the text matters
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .result import TraceResult

# What each prediction type calls the U-Net's output, in formulas.
SYMBOL = {"epsilon": "ε", "v_prediction": "v", "sample": "x̂0"}
NOUN = {
    "epsilon": "the noise",
    "v_prediction": "the velocity v (a mix of noise and image)",
    "sample": "the clean latent",
}
# Schedulers whose next latent is not only a mix of this step's x_t and x0.
NOT_ONLY_THIS_STEP = {
    "DDPMScheduler": "it adds fresh random noise at every step",
    "EulerAncestralDiscreteScheduler": "it adds fresh random noise at every step (the “a” is for ancestral)",
    "DPMSolverMultistepScheduler": "it also uses the previous step's x0 (a multistep method)",
    "UniPCMultistepScheduler": "it also uses earlier steps' predictions (a multistep method)",
    "PNDMScheduler": "it also uses earlier steps' predictions (a multistep method)",
    "LMSDiscreteScheduler": "it also uses earlier steps' predictions (a multistep method)",
}


@dataclass(frozen=True)
class StepAnatomy:
    """One recorded step; tensors are [C, h, w] float32 on the CPU."""

    step: int  # 0-based
    total: int  # steps recorded
    timestep: float
    sigma: float
    alpha_bar: float
    guidance_scale: float
    prediction_type: str  # what the U-Net predicts: "epsilon", "v_prediction" or "sample"
    sigma_space: bool  # the Euler family: x_t = x0 + σ·ε
    scheduler: str
    x_t: torch.Tensor  # the latent entering the step
    uncond: torch.Tensor | None  # the U-Net's output without the prompt (None: guidance did not run)
    text: torch.Tensor | None  # … with the prompt
    guided: torch.Tensor  # what the scheduler got (after guidance)
    x0: torch.Tensor  # the step's guess of the clean latent
    x_next: torch.Tensor  # what the step returned: the next step's x_t (the final latent after the last)
    next_timestep: float | None  # None after the last step

    @property
    def cfg(self) -> bool:
        return self.uncond is not None and self.text is not None

    @property
    def symbol(self) -> str:
        return SYMBOL.get(self.prediction_type, "output")

    @property
    def prompt_effect(self) -> torch.Tensor:
        """ε_text − ε_uncond: what the prompt changes in the prediction."""
        self._need_cfg()
        return self.text - self.uncond

    @property
    def guided_by_formula(self) -> torch.Tensor:
        """ε_uncond + s·(ε_text − ε_uncond), computed as the pipeline does."""
        self._need_cfg()
        return self.uncond + self.guidance_scale * (self.text - self.uncond)

    @property
    def formula_error(self) -> float | None:
        """Largest |formula − recorded guided output|: ~0, unless the pipeline changed the output after guidance
        (`guidance_rescale`). None without guidance."""
        return float((self.guided_by_formula - self.guided).abs().max()) if self.cfg else None

    @property
    def contribution(self) -> float | None:
        """‖ε_text − ε_uncond‖ / ‖ε_uncond‖: how much the prompt changes the prediction, relative to its size."""
        return _relative(self.uncond, self.text) if self.cfg else None

    def mix(self) -> tuple[float, float, float]:
        """(keep, pull, explained): the least-squares fit x_next ≈ keep·x_t + pull·x0 over the whole latent, and the
        share of x_next it explains (1 − residual² / x_next²). DDIM and Euler steps are exactly such a mix (1.0)."""
        basis = torch.stack([self.x_t.flatten(), self.x0.flatten()], 1).double()  # [n, 2]
        target = self.x_next.flatten().double()  # [n]
        coef = torch.linalg.lstsq(basis, target[:, None]).solution[:, 0]
        residual = target - basis @ coef
        explained = 1.0 - float(residual.square().sum() / target.square().sum().clamp_min(1e-30))
        return float(coef[0]), float(coef[1]), explained

    def x0_formula(self) -> tuple[str, callable]:
        """The formula that turns this step's output into x0, as text, and as a function of (x_t, output)."""
        a, s, sg = math.sqrt(self.alpha_bar), math.sqrt(1 - self.alpha_bar), self.sigma
        o = self.symbol
        if self.prediction_type == "sample":
            return f"x0 = {o}", lambda x, out: out
        if self.sigma_space and self.prediction_type == "epsilon":
            return f"x0 = x_t − σ·{o} = x_t − {sg:.3f}·{o}", lambda x, out: x - sg * out
        if self.sigma_space:
            k1, k2 = 1 / (sg**2 + 1), sg / math.sqrt(sg**2 + 1)
            return f"x0 = x_t/(σ²+1) − σ/√(σ²+1)·{o} = {k1:.3f}·x_t − {k2:.3f}·{o}", lambda x, out: k1 * x - k2 * out
        if self.prediction_type == "epsilon":
            return (f"x0 = (x_t − √(1−ᾱ)·{o}) / √ᾱ = (x_t − {s:.3f}·{o}) / {a:.3f}",
                    lambda x, out: (x - s * out) / a)  # fmt: skip
        return f"x0 = √ᾱ·x_t − √(1−ᾱ)·{o} = {a:.3f}·x_t − {s:.3f}·{o}", lambda x, out: a * x - s * out

    def _need_cfg(self):
        if not self.cfg:
            raise ValueError(
                "guidance did not run in this trace (guidance scale ≤ 1), so the U-Net made one prediction per "
                "step: generate with a guidance scale above 1 to see both"
            )


def _relative(uncond: torch.Tensor, text: torch.Tensor) -> float:
    return float((text - uncond).norm() / uncond.norm().clamp_min(1e-12))


def step_anatomy(run: TraceResult, step: int) -> StepAnatomy:
    """Step `step` (0-based; negative counts from the end) of `run`, taken apart."""
    i = run.step_indices(step)[0]
    has_cfg = run.noise_pred_text is not None and run.noise_pred_text.numel() > 0
    last = i == run.num_steps - 1
    if last and run.final_latent is None:
        raise ValueError("this trace has no latent after its last step")
    info = run.info
    return StepAnatomy(
        step=i,
        total=run.num_steps,
        timestep=float(run.timesteps[i]),
        sigma=float(run.sigmas[i]),
        alpha_bar=float(run.alpha_bars[i]),
        guidance_scale=float(info.guidance_scale),
        prediction_type=info.prediction_type,
        sigma_space=bool(info.sigma_space),
        scheduler=info.scheduler,
        x_t=run.latents[i].float(),
        uncond=run.noise_pred_uncond[i].float() if has_cfg else None,
        text=run.noise_pred_text[i].float() if has_cfg else None,
        guided=run.model_outputs[i].float(),
        x0=run.x0[i].float(),
        x_next=(run.final_latent if last else run.latents[i + 1]).float(),
        next_timestep=None if last else float(run.timesteps[i + 1]),
    )


def guidance_contribution(run: TraceResult) -> np.ndarray:
    """float32 [S]: per step, ‖ε_text − ε_uncond‖ / ‖ε_uncond‖ over the whole latent — how much the prompt
    changes the U-Net's prediction, before guidance multiplies that change by the scale s."""
    if run.noise_pred_text is None or run.noise_pred_text.numel() == 0:
        raise ValueError(
            "guidance did not run in this trace (guidance scale ≤ 1, or a trace saved by an older sdviz), so "
            "there is no prediction without the prompt to compare with: generate with a guidance scale above 1"
        )
    return np.array(
        [_relative(u, t) for u, t in zip(run.noise_pred_uncond.float(), run.noise_pred_text.float())], np.float32
    )


def formula_number(value: float, bracket: bool = True) -> str:
    """A number as written in a formula: 3 decimals, a true minus sign, and (in a sum) brackets when negative:
    −0.5 → "(−0.500)"; with `bracket=False` (a result on its own) "−0.500"."""
    text = f"{value:.3f}".replace("-", "−")
    return f"({text})" if bracket and value < 0 else text


def telling_element(a: StepAnatomy) -> tuple[int, int, int]:
    """(channel, row, column) of one latent number to work through: where the prompt changes the prediction
    most (or, without guidance, where the prediction is largest)."""
    effect = (a.text - a.uncond).abs() if a.cfg else a.guided.abs()  # [C, h, w]
    c, r, col = np.unravel_index(int(effect.argmax()), tuple(effect.shape))
    return int(c), int(r), int(col)


def explain(a: StepAnatomy) -> str:
    """The step's arithmetic in Markdown: guidance, x0 and the next latent, each filled in with this step's
    numbers and with one latent number worked through."""
    head, items = explain_parts(a)
    return head + "\n\n" + "\n".join(f"{n}. {item}" for n, item in enumerate(items, 1))


def explain_parts(a: StepAnatomy) -> tuple[str, list[str]]:
    """`explain` as (heading paragraphs, numbered items), each in Markdown (bold and code only), for other pages."""
    n = formula_number

    def alone(value: float) -> str:
        return formula_number(value, bracket=False)

    c, r, col = telling_element(a)
    o, at = a.symbol, f"[{c}, {r}, {col}]"
    level = f"σ = {a.sigma:.3f}" if a.sigma_space else f"ᾱ = {a.alpha_bar:.3f} (σ = {a.sigma:.3f})"
    head = (
        f"**Step {a.step + 1} of {a.total}** · timestep t = {a.timestep:.0f} · noise level {level} · "
        f"guidance scale s = {a.guidance_scale:g} · the U-Net predicts {NOUN.get(a.prediction_type, 'its output')}."
        f"\n\nWe follow one number of the latent: channel {c}, row {r}, column {col} (written {at}), "
        + ("where the prompt changed the prediction most." if a.cfg else "where the prediction is largest.")
    )
    items = []
    out = a.guided[c, r, col].item()
    # 1. The two predictions and guidance.
    if a.cfg:
        u, t = a.uncond[c, r, col].item(), a.text[c, r, col].item()
        formula = u + a.guidance_scale * (t - u)
        items.append(
            f"**Two predictions.** The U-Net ran twice on the same x_t: without the prompt ({o}_uncond) and with "
            f"it ({o}_text). At {at}: {o}_uncond = {alone(u)}, {o}_text = {alone(t)}. Over the whole latent the prompt "
            f"changes the prediction by {100 * a.contribution:.1f} % (‖{o}_text − {o}_uncond‖ / ‖{o}_uncond‖)."
        )
        guidance = (
            f"**Guidance.** {o} = {o}_uncond + s·({o}_text − {o}_uncond) = {n(u)} + {a.guidance_scale:g} × "
            f"({n(t)} − {n(u)}) = **{alone(formula)}**: start from the prediction without the prompt and go s times "
            "as far in the direction the prompt points."
        )
        if a.formula_error > 1e-4:
            guidance += (
                f" The scheduler got {out:.3f} there, not {formula:.3f}: the pipeline changed the guided prediction "
                f"after this formula (by up to {a.formula_error:.3f} anywhere; `guidance_rescale` does this)."
            )
        items.append(guidance)
    else:
        items.append(
            f"**One prediction.** Guidance was off (s ≤ 1), so the U-Net ran once, with the prompt: "
            f"{o} = {out:.3f} at {at}."
        )
    # 2. The clean guess x0.
    text, fn = a.x0_formula()
    x = a.x_t[c, r, col].item()
    x0_here, recorded = fn(x, out), a.x0[c, r, col].item()
    clean = f"**The clean guess.** {text}. At {at}: x_t = {alone(x)}, so x0 = **{alone(x0_here)}**"
    if abs(x0_here - recorded) > 1e-3 * max(1.0, abs(recorded)):
        clean += f" (the scheduler's own x0 there is {recorded:.3f}: it clips or thresholds its guess)"
    items.append(clean + ".")
    # 3. The next latent: a mix of x_t and x0 (exactly, for DDIM and Euler).
    keep, pull, explained = a.mix()
    nxt = a.x_next[c, r, col].item()
    where = "the final latent" if a.next_timestep is None else f"x_t of the next step, t = {a.next_timestep:.0f}"
    step = (
        f"**The next latent.** The scheduler ({a.scheduler}) mixes x_t and x0: x_next = {keep:.3f}·x_t + "
        f"{pull:.3f}·x0 — it keeps {keep:.3f} of the noisy latent and moves toward the clean guess. At {at}: "
        f"{keep:.3f} × {n(x)} + {pull:.3f} × {n(recorded)} = {alone(keep * x + pull * recorded)}; the step "
        f"returned **{alone(nxt)}** ({where})."
    )
    if explained < 0.999:
        why = NOT_ONLY_THIS_STEP.get(a.scheduler, "it uses more than this step's x_t and x0")
        step += f" This mix explains {100 * explained:.1f} % of the next latent, not all of it: {why}."
    items.append(step)
    return head, items
