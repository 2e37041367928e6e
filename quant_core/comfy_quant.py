"""ComfyUI's on-disk layout of a quantized layer; the only module that knows these names.

For a layer ``L`` (the weight key without ``.weight``) a quantized checkpoint holds:

- ``L.weight``       codes (``F8_E4M3`` or ``I8``), shape ``[out, in]``
- ``L.weight_scale`` ``F32`` dequantization factor, shape as in :mod:`.formats`
- ``L.input_scale``  optional ``F32`` ``[]`` activation scale (FP8 only)
- ``L.comfy_quant``  ``U8`` ``[n]``: the UTF-8 JSON of the layer's settings

and the header entry ``_quantization_metadata`` = ``{"format_version": "1.0", "layers": {L:
settings}}``. ComfyUI rebuilds every ``.comfy_quant`` from that header when it is present, so
both are always written from the same dict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from . import dtypes
from .formats import Format

QUANT_METADATA_KEY = "_quantization_metadata"
PACK_METADATA_KEY = "comfyui_quantizer"
WEIGHT_SUFFIX = ".weight"
SCALE_SUFFIX = ".weight_scale"
INPUT_SCALE_SUFFIX = ".input_scale"
CONF_SUFFIX = ".comfy_quant"
BIAS_SUFFIX = ".bias"  # a layer's own bias (rewritten by bias correction)


def layer_name(weight_key: str) -> str:
    """``blocks.0.attn.qkv.weight`` -> ``blocks.0.attn.qkv``."""
    if not weight_key.endswith(WEIGHT_SUFFIX):
        raise ValueError(f"{weight_key} is not a weight key")
    return weight_key[: -len(WEIGHT_SUFFIX)]


def encode_settings(settings: Mapping[str, object]) -> bytes:
    """The exact bytes stored in ``.comfy_quant`` (compact JSON, key order kept)."""
    return json.dumps(dict(settings), separators=(",", ":")).encode("utf-8")


def settings_tensor(settings: Mapping[str, object]) -> torch.Tensor:
    """``.comfy_quant`` tensor: 1-D ``uint8`` holding :func:`encode_settings`."""
    return torch.frombuffer(bytearray(encode_settings(settings)), dtype=torch.uint8).clone()


def decode_settings(tensor: torch.Tensor) -> dict[str, object]:
    """Parse a ``.comfy_quant`` tensor back into a dict."""
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))


def output_specs(
    layer: str,
    shape: tuple[int, ...],
    fmt: Format,
    settings: Mapping[str, object],
    *,
    with_input_scale: bool = False,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(key, safetensors dtype, shape)`` of every tensor a quantized layer writes."""
    specs = [
        (layer + WEIGHT_SUFFIX, dtypes.to_safetensors(fmt.code_dtype), tuple(shape)),
        (layer + SCALE_SUFFIX, "F32", fmt.scale_shape(tuple(shape))),
        (layer + CONF_SUFFIX, "U8", (len(encode_settings(settings)),)),
    ]
    if with_input_scale:
        specs.append((layer + INPUT_SCALE_SUFFIX, "F32", ()))
    return specs


def layer_tensors(
    layer: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    settings: Mapping[str, object],
    *,
    input_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of one quantized layer, keyed by their checkpoint names."""
    out = {
        layer + WEIGHT_SUFFIX: codes,
        layer + SCALE_SUFFIX: scale.to(torch.float32),
        layer + CONF_SUFFIX: settings_tensor(settings),
    }
    if input_scale is not None:
        out[layer + INPUT_SCALE_SUFFIX] = input_scale.reshape(()).to(torch.float32)
    return out


def header_metadata(layers: Mapping[str, Mapping[str, object]]) -> str:
    """Value of the ``_quantization_metadata`` header entry for these layer settings."""
    return json.dumps(
        {"format_version": "1.0", "layers": {k: dict(v) for k, v in layers.items()}},
        separators=(",", ":"),
    )


def settings_for(fmt: Format, *, full_precision_matrix_mult: bool = False) -> dict[str, object]:
    """Per-layer settings dict for ``fmt`` (what goes into ``.comfy_quant``)."""
    settings = fmt.comfy_quant()
    if full_precision_matrix_mult:
        settings["full_precision_matrix_mult"] = True
    return settings
