"""Models that ComfyUI already holds (a MODEL, a CLIP) as ``quant_core`` sources.

A ComfyUI MODEL or CLIP wraps its module in a ModelPatcher; ``patch_weight_to_device(key,
return_weight=True)`` returns a weight with every patch applied (LoRAs included) without
touching the loaded model, so quantizing through it bakes the LoRAs in. Only the patcher's
public methods are used, and nothing here imports ComfyUI: the node passes the objects in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..quant_core import InputError, SafetensorsSource, TensorInfo
from ..quant_core.dtypes import to_safetensors, to_torch
from .result import ModelType

DIFFUSION_PREFIX = "diffusion_model."
# Text-encoder components ComfyUI names after CLIP. A quantized CLIP-L/G loads *silently
# wrong* in ComfyUI, so they are refused rather than converted.
CLIP_COMPONENTS = ("clip_l", "clip_g", "clip_h", "hydit_clip")


class Patcher(Protocol):
    """The part of ComfyUI's ModelPatcher this module uses."""

    model: torch.nn.Module

    def patch_weight_to_device(self, key: str, *, return_weight: bool) -> torch.Tensor: ...


class PatcherSource:
    """The tensors under ``prefix`` of a patched model, named as in a standalone file.

    Keys lose ``prefix``; ``extra`` adds tensors that are not parameters (a tokenizer's data).
    Reading a key applies the patches.
    """

    def __init__(
        self,
        patcher: Patcher,
        *,
        name: str,
        prefix: str,
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._patcher = patcher
        self._name = name
        self._keys: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._extra = dict(extra or {})
        for key, tensor in patcher.model.state_dict().items():
            if not key.startswith(prefix):
                continue
            out = key[len(prefix) :]
            self._add(out, tensor)
            self._keys[out] = key
        for key, tensor in self._extra.items():
            self._add(key, tensor)
        if not self._infos:
            raise InputError(f"{name}: holds no tensors under {prefix!r}")

    def _add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._infos:
            raise InputError(f"{self._name}: two tensors map to the key {key}")
        try:
            dtype = to_safetensors(tensor.dtype)
        except ValueError:
            raise InputError(f"{self._name}: {key}: dtype {tensor.dtype} cannot be saved") from None
        self._infos[key] = TensorInfo(key, dtype, tuple(tensor.shape))

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path | None:
        return None

    @property
    def metadata(self) -> Mapping[str, str]:
        return {}

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        info = self._infos[key]
        if key in self._extra:
            tensor = self._extra[key]
        else:
            tensor = self._patcher.patch_weight_to_device(self._keys[key], return_weight=True)
        tensor = tensor.detach().to("cpu")
        if to_safetensors(tensor.dtype) != info.dtype:  # a patch that changed the dtype
            tensor = tensor.to(to_torch(info.dtype))
        return tensor


def model_source(model: Any, *, name: str = "MODEL input") -> PatcherSource:
    """A ComfyUI MODEL's diffusion model, keys as in a ``diffusion_models`` file."""
    return PatcherSource(model, name=name, prefix=DIFFUSION_PREFIX)


def text_encoder_components(patcher: Patcher) -> list[str]:
    """Names of the encoders inside a CLIP's module (``t5xxl``, ``clip_l``, ``qwen3_4b``...)."""
    return sorted({key.split(".", 1)[0] for key in patcher.model.state_dict()})


def clip_source(clip: Any, *, name: str = "CLIP input") -> PatcherSource:
    """A CLIP holding exactly one T5/LLM-style encoder, keys as in a ``text_encoders`` file.

    Refuses CLIP-L/G (they load silently wrong when quantized) and combined CLIPs (each
    encoder is its own file: load the one to quantize alone with a CLIP loader).
    """
    patcher = clip.patcher
    components = text_encoder_components(patcher)
    clips = [c for c in components if c in CLIP_COMPONENTS or c.startswith("clip_")]
    if clips:
        raise InputError(
            f"{name}: holds {', '.join(clips)}; CLIP-L/G text encoders load silently wrong "
            "when quantized, so they are not converted. Quantize the T5 / LLM encoder alone "
            "(load its file with a CLIP loader)."
        )
    if len(components) != 1:
        raise InputError(
            f"{name}: holds several text encoders ({', '.join(components)}); load the one to "
            "quantize alone with a CLIP loader"
        )
    component = components[0]
    tokenizer = {
        k: v for k, v in clip.tokenizer.state_dict().items() if isinstance(v, torch.Tensor)
    }
    # ComfyUI nests the encoder under ``<component>.transformer.``; its file does not, and the
    # wrapper's own parameters (``logit_scale``) are not part of the encoder's file.
    return PatcherSource(
        patcher,
        name=f"{name} ({component})",
        prefix=f"{component}.transformer.",
        extra=tokenizer,
    )


@dataclass(frozen=True)
class ModelFile:
    """What Load Model for Quantization outputs: a file and its kind; nothing is loaded."""

    path: Path
    model_type: ModelType

    def open(self) -> SafetensorsSource:
        """The lazy source (header parsed and validated; tensors read one at a time)."""
        return SafetensorsSource(self.path)
