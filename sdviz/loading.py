"""`load_pipeline`: model presets, device and dtype, and clear errors when weights can't be had.

Accepts a preset name ("toy", "sd15", "sd21-base", "sd21", "sd-turbo", "sdxl"), a Hub id or a local
diffusers folder. safetensors only, never remote code. Offline and not cached fails within seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

TOY_MODEL_DIR = Path(__file__).parent / "toy" / "model"


@dataclass(frozen=True)
class Preset:
    source: str  # Hub id or folder
    label: str  # what the app shows
    steps: int  # sensible defaults for this model
    guidance: float
    size: int
    scheduler: str
    max_steps: int = 100


PRESETS: dict[str, Preset] = {
    "toy": Preset(str(TOY_MODEL_DIR), "Built-in shapes model (offline, 64×64)", 20, 4.0, 64, "DDIM"),
    "sd15": Preset("stable-diffusion-v1-5/stable-diffusion-v1-5", "Stable Diffusion 1.5", 25, 7.5, 512, "DPM++ 2M"),
    "sd21-base": Preset(
        "stabilityai/stable-diffusion-2-1-base", "Stable Diffusion 2.1 base (512)", 25, 7.5, 512, "DPM++ 2M"
    ),
    "sd21": Preset(
        "stabilityai/stable-diffusion-2-1", "Stable Diffusion 2.1 (768, v-prediction)", 25, 7.5, 768, "DPM++ 2M"
    ),
    "sd-turbo": Preset("stabilityai/sd-turbo", "SD-Turbo (1–4 steps, no guidance)", 2, 0.0, 512, "Euler a", 4),
    "sdxl": Preset("stabilityai/stable-diffusion-xl-base-1.0", "Stable Diffusion XL base", 30, 7.0, 1024, "Euler"),
}


class ModelUnavailableError(RuntimeError):
    """The model is neither a local folder nor in the Hugging Face cache, and the Hub can't be reached."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, large: bool = True) -> torch.dtype:
    """fp16 on CUDA/MPS; on CPU bf16 only where AMX makes it fast and the model is large, else fp32.

    Without AMX, bf16 matmuls on CPU are no faster than fp32 and lose precision (see the README's
    benchmark); the tiny built-in model is fastest and exact in fp32.
    """
    if device.type in ("cuda", "mps"):
        return torch.float16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if (amx and large) else torch.float32


SMALL_UNET = 50_000_000  # parameters: below this, one CPU thread is faster than two whenever the CPU is shared
THREADS_ENV = "SDVIZ_THREADS"


def pick_threads(pipe=None, requested: int | None = None) -> int:
    """How many CPU threads torch should use for `pipe`: `requested`, else $SDVIZ_THREADS, else one thread
    for a small model (the built-in one) and every core the process may use for a large one.

    Why (README, "Threads"): a tiny model's operations are so short that two OpenMP threads spend their
    time waiting for each other, and with another busy process on the machine (a Space's own web
    server, a second user, a training job) two threads ran 5–17× slower than one; a large model's
    matrix products keep both cores busy and gain from the second one.
    """
    if requested is None and os.environ.get(THREADS_ENV):
        requested = int(os.environ[THREADS_ENV])
    if requested is not None:
        if requested < 1:
            raise ValueError(f"the number of CPU threads must be 1 or more; got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    unet = getattr(pipe, "unet", None)
    small = unet is not None and sum(p.numel() for p in unet.parameters()) < SMALL_UNET
    return 1 if small else cores


@contextlib.contextmanager
def cpu_threads(count: int):
    """Run the block with torch using `count` CPU threads, and give the previous number back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(name: str, why: str) -> str:
    return (
        f"Can't load {name!r}: {why}. It is not in the local Hugging Face cache either. "
        f"Download it once on a connected machine (`huggingface-cli download {name}`) and copy the cache "
        f"(~/.cache/huggingface), or pass a local diffusers folder, or use the built-in offline model "
        f'`load_pipeline("toy")`.'
    )


def resolve(name_or_path: str) -> str:
    """A preset name → its source; anything else unchanged."""
    preset = PRESETS.get(str(name_or_path))
    return preset.source if preset else str(name_or_path)


def load_pipeline(name_or_path: str = "toy", device=None, dtype: torch.dtype | None = None):
    """A diffusers Stable Diffusion pipeline (1.x, 2.x, Turbo or XL) ready to trace.

    name_or_path: a preset name (see `PRESETS`), a Hub id, or a local diffusers folder.
    device: "cuda", "mps", "cpu" or None to pick the best available.
    dtype: None picks fp16 on GPUs and fp32 or bf16 on CPU (see `pick_dtype`).
    Raises ModelUnavailableError within seconds when offline and not cached.
    """
    from diffusers import DiffusionPipeline

    source = resolve(name_or_path)
    local = Path(source).expanduser()
    device = pick_device(device)
    # A local folder is large by its UNet's size (the built-in model and small test models stay fp32); a Hub
    # model is a real one.
    unet_size = unet_parameters(local) if local.is_dir() else None
    dtype = dtype or pick_dtype(device, large=unet_size is None or unet_size >= SMALL_UNET)
    kwargs = dict(use_safetensors=True, dtype=dtype)

    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{local} is a folder but not a diffusers pipeline (no model_index.json). "
                f"Save one with pipe.save_pretrained(folder)."
            )
        pipe = DiffusionPipeline.from_pretrained(str(local), **_extra_kwargs(local / "model_index.json"), **kwargs)
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        pipe = _from_hub(source, kwargs)
    else:
        presets = ", ".join(PRESETS)
        if str(name_or_path) == "toy":
            raise FileNotFoundError(
                f"the built-in model is missing from {TOY_MODEL_DIR}; reinstall sdviz or train "
                f"it with `python -m sdviz.toy.train`"
            )
        raise FileNotFoundError(
            f"{name_or_path!r} is not a preset ({presets}), not a local folder and not a Hub id of the form owner/name"
        )
    _check_traceable(pipe, source)
    return pipe.to(device)


def unet_parameters(folder: Path) -> int | None:
    """The number of parameters in a pipeline folder's UNet weights, read from the safetensors headers
    without loading them; None when the folder has no such file."""
    from safetensors import safe_open

    files = sorted((folder / "unet").glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    return total


def _extra_kwargs(model_index: Path) -> dict:
    import json

    components = json.loads(model_index.read_text())
    # Loading without the safety checker: sdviz shows what the model does; operators of a public
    # Space can add their own filter.
    if "safety_checker" in components:
        return dict(safety_checker=None, requires_safety_checker=False)
    return {}


def _from_hub(repo_id: str, kwargs: dict):
    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.txt"])
    except Exception:  # not cached: look online, but never hang on a closed network
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ModelUnavailableError(_offline_message(repo_id, "HF_HUB_OFFLINE is set")) from None
        if not hub_reachable():
            raise ModelUnavailableError(_offline_message(repo_id, "the Hugging Face Hub can't be reached")) from None
        try:
            folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt"])
        except Exception as e:
            raise ModelUnavailableError(f"Can't load {repo_id!r} from the Hub: {e}") from e
    extra = _extra_kwargs(Path(folder) / "model_index.json")
    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **extra, **kwargs)
    except Exception:
        if not hub_reachable():
            raise ModelUnavailableError(
                _offline_message(repo_id, "its weights are not cached and the Hub can't be reached")
            ) from None
        return DiffusionPipeline.from_pretrained(repo_id, **extra, **kwargs)


def _check_traceable(pipe, source: str):
    unet = getattr(pipe, "unet", None)
    if unet is None or not any("attn2" in k for k in getattr(unet, "attn_processors", {})):
        raise TypeError(
            f"{source} loads as {type(pipe).__name__}, which has no U-Net with cross-attention; "
            f"sdviz traces Stable Diffusion 1.x, 2.x, Turbo and XL pipelines"
        )
