"""Everything the nodes ask of ComfyUI itself, in one place (imported only inside ComfyUI).

Folders, the progress bar, the interrupt flag, websocket events and rebuilding a MODEL from a
quantized file. The node classes stay declarative; the logic they run lives in modules that
CI tests without ComfyUI.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NoReturn

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from server import PromptServer

import nodes as comfy_nodes  # ComfyUI's own nodes.py (this pack's folder is a package)

from ..quant_core import Cancelled, Progress
from .events import EVENT_LAYER, layer_payload

log = logging.getLogger(__name__)

LOADER_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders")
SAVE_FOLDERS = ("diffusion_models", "text_encoders", "checkpoints", "output")
MODEL_SUFFIXES = (".safetensors", ".sft")


def model_choices() -> list[str]:
    """``folder/file`` for every safetensors file in the loader folders (fresh each call)."""
    return [
        f"{folder}/{name}"
        for folder in LOADER_FOLDERS
        for name in folder_paths.get_filename_list(folder)
        if name.lower().endswith(MODEL_SUFFIXES)
    ]


def resolve_model_choice(choice: str) -> tuple[str, Path]:
    """``folder/file`` -> (folder, absolute path); raises if the file is gone."""
    folder, _, name = choice.partition("/")
    if folder not in LOADER_FOLDERS or not name:
        raise ValueError(f"{choice!r} is not one of the model files (pick one from the list)")
    return folder, Path(folder_paths.get_full_path_or_raise(folder, name))


def save_folder(destination: str) -> Path:
    """The folder a destination choice writes to (the first, default path of that kind)."""
    if destination == "output":
        return Path(folder_paths.get_output_directory())
    return Path(folder_paths.get_folder_paths(destination)[0])


def temp_folder() -> Path:
    return Path(folder_paths.get_temp_directory()) / "comfyui_quantizer"


def compute_device() -> str:
    """ComfyUI's compute device as a ``QuantConfig.device`` string (``cpu`` unless CUDA)."""
    device = comfy.model_management.get_torch_device()
    return str(device) if getattr(device, "type", "cpu") == "cuda" else "cpu"


def interrupted() -> bool:
    """Whether the user pressed Cancel (the flag ``/interrupt`` sets)."""
    return comfy.model_management.processing_interrupted()


def raise_interrupt(cancelled: Cancelled) -> NoReturn:
    """Turn our ``Cancelled`` into ComfyUI's interrupt, so the UI shows 'interrupted'."""
    comfy.model_management.throw_exception_if_processing_interrupted()  # also clears the flag
    raise comfy.model_management.InterruptProcessingException() from cancelled


def send(event: str, payload: dict[str, Any]) -> None:
    """A custom websocket event to the client that queued the prompt."""
    server = PromptServer.instance
    server.send_sync(event, payload, server.client_id)


class ProgressReporter:
    """quant_core progress -> ComfyUI's progress bar (per layer) and a per-layer event."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id
        self._bar: comfy.utils.ProgressBar | None = None

    def __call__(self, progress: Progress) -> None:
        if self._bar is None:
            self._bar = comfy.utils.ProgressBar(progress.total, node_id=self._node_id)
        self._bar.update_absolute(progress.position, progress.total)
        send(EVENT_LAYER, layer_payload(self._node_id, progress))


SAMPLERS: list[str] = list(comfy.samplers.KSampler.SAMPLERS)
SCHEDULERS: list[str] = list(comfy.samplers.KSampler.SCHEDULERS)


def sample(
    model: Any,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Any,
    negative: Any,
    latent: dict[str, Any],
) -> dict[str, Any]:
    """What KSampler does (noise, sampling, progress bar, preview, interrupt): the new latent."""
    (out,) = comfy_nodes.common_ksampler(
        model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent
    )
    return out


def diffusion_module(model: Any) -> Any:
    """The MODEL's diffusion network: its state-dict names are those of a diffusion file."""
    return model.model.diffusion_model


def load_diffusion_model(path: Path) -> tuple[Any, str | None]:
    """A MODEL from a quantized diffusion-model file, exactly as UNETLoader builds it.

    Returns ``(model, None)``, or ``(None, why)`` when ComfyUI cannot build it (the file is
    still good to save: a pack-only format elsewhere, an architecture it does not know).
    """
    try:
        sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={}, metadata=metadata)
    except Exception as e:  # ComfyUI raises plain exceptions for unknown formats
        why = f"no MODEL output: ComfyUI could not load the result ({type(e).__name__}: {e})"
        log.warning("comfyui-quantizer: %s", why)
        return None, why
    if model is None:
        why = "no MODEL output: ComfyUI does not recognise this diffusion model's architecture"
        log.warning("comfyui-quantizer: %s", why)
        return None, why
    return model, None
