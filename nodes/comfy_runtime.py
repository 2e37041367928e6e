"""Teach a running ComfyUI to load, run, patch and save the pack-only formats.

Imported only inside ComfyUI (the pack's ``__init__`` checks ``sys.modules`` first). What stock
ComfyUI does with a ``.comfy_quant`` layer (``comfy/ops.py``): ``_load_quantized_module`` looks the
format up in ``comfy.quant_ops.QUANT_ALGOS`` (a ``KeyError`` for unknown names aborts the whole
load) and then walks an if-chain of known formats that ends in ``ValueError("Unsupported
quantization format")``; ``_quantized_weight_state_dict`` writes the layer back on save. So a
``QUANT_ALGOS`` entry alone is not enough. :func:`register`:

1. checks that this ComfyUI has every hook it needs (else: one warning line, nothing changed);
2. registers our comfy-kitchen layouts (:mod:`.layouts`) and adds a ``QUANT_ALGOS`` entry per
   pack-only format that ComfyUI does not know yet (a name it knows keeps its own code);
3. wraps ``comfy.ops._load_quantized_module`` so that layers in those formats are read by
   :func:`_load_pack_layer` (every other layer goes to ComfyUI's own function, untouched), and
   ``comfy.ops._quantized_weight_state_dict`` so that a saved block layer keeps its
   ``group_size`` (ComfyUI writes only ``format``).

Everything else is ComfyUI's own machinery: ``UNETLoader``/``CheckpointLoader``/``CLIPLoader``
build ``MixedPrecisionOps`` linears, LoRA patches dequantize -> patch -> ``requantize_from_float``
(round-to-nearest in the same format), and ``ModelSave`` writes ``QuantizedTensor.state_dict``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .layout_math import LAYOUT_NAMES, PACK_FORMATS, check_layer, format_for

logger = logging.getLogger("comfyui_quantizer.runtime")

# Attribute set on our wrappers so that importing the pack twice never wraps twice.
_WRAPPED_MARK = "_comfyui_quantizer_formats"

_LOAD_PARAMS = (
    "module", "super_load", "state_dict", "prefix", "local_metadata", "strict",
    "missing_keys", "unexpected_keys", "error_msgs", "load_extra_params",
)  # fmt: skip
_SAVE_PARAMS = ("module", "sd", "prefix", "extra_quant_conf", "extra_quant_params")


@dataclass(frozen=True)
class RuntimeStatus:
    """What :func:`register` did: formats added, formats left to ComfyUI, or why nothing."""

    registered: tuple[str, ...] = ()
    left_to_comfyui: tuple[str, ...] = ()
    unsupported: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.unsupported is None


def _has_params(fn: object, names: tuple[str, ...]) -> bool:
    if not callable(fn):
        return False
    try:
        params = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return params[: len(names)] == names


def missing_hooks(ops: ModuleType, quant_ops: ModuleType) -> list[str]:
    """Names of the ComfyUI hooks this runtime needs that ``ops``/``quant_ops`` lack."""
    missing = []
    if not isinstance(getattr(quant_ops, "QUANT_ALGOS", None), dict):
        missing.append("comfy.quant_ops.QUANT_ALGOS")
    if not getattr(quant_ops, "_CK_AVAILABLE", False):
        missing.append("comfy_kitchen (comfy.quant_ops._CK_AVAILABLE is false)")
    if not callable(getattr(quant_ops, "register_layout_class", None)):
        missing.append("comfy.quant_ops.register_layout_class")
    if not _has_params(getattr(ops, "_load_quantized_module", None), _LOAD_PARAMS):
        missing.append("comfy.ops._load_quantized_module(module, super_load, state_dict, ...)")
    if not _has_params(getattr(ops, "_quantized_weight_state_dict", None), _SAVE_PARAMS):
        missing.append("comfy.ops._quantized_weight_state_dict(module, sd, prefix, ...)")
    return missing


def formats_to_register(quant_algos: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(ours, theirs)``: pack-only formats we (still) serve, and those ComfyUI implements.

    A name already in ``QUANT_ALGOS`` with one of our layouts was registered by an earlier
    import of the pack and stays ours; with any other layout it is ComfyUI's own.
    """
    theirs = [
        name
        for name in PACK_FORMATS
        if name in quant_algos
        and dict(quant_algos[name]).get("comfy_tensor_layout") != LAYOUT_NAMES[name]
    ]
    return [name for name in PACK_FORMATS if name not in theirs], theirs


def register(ops: ModuleType | None = None, quant_ops: ModuleType | None = None) -> RuntimeStatus:
    """Register the pack-only formats with the running ComfyUI; never raises.

    ``ops``/``quant_ops`` default to ``comfy.ops``/``comfy.quant_ops``.
    """
    try:
        if ops is None or quant_ops is None:
            import comfy.ops as ops
            import comfy.quant_ops as quant_ops
        missing = missing_hooks(ops, quant_ops)
        if missing:
            return _unsupported("this ComfyUI lacks " + ", ".join(missing))
        return _register(ops, quant_ops)
    except Exception as exc:  # a ComfyUI we do not understand must not stop ComfyUI
        return _unsupported(f"registration failed ({type(exc).__name__}: {exc})")


def _unsupported(why: str) -> RuntimeStatus:
    logger.warning(
        "comfyui-quantizer: pack-only formats (%s) are NOT available: %s; such files fail to "
        "load as in stock ComfyUI (KeyError on the format name)",
        ", ".join(PACK_FORMATS),
        why,
    )
    return RuntimeStatus(unsupported=why)


def _register(ops: ModuleType, quant_ops: ModuleType) -> RuntimeStatus:
    from . import layouts

    ours, theirs = formats_to_register(quant_ops.QUANT_ALGOS)
    layouts.register_with_kitchen()
    # Loader hooks first: until QUANT_ALGOS names a format they only ever delegate.
    load, save = ops._load_quantized_module, ops._quantized_weight_state_dict
    known = frozenset(getattr(load, _WRAPPED_MARK, frozenset()))
    handled = frozenset(ours) | known
    if handled != known:
        ops._load_quantized_module = _wrap_load(_unwrapped(load), handled)
        ops._quantized_weight_state_dict = _wrap_save(_unwrapped(save), handled)
    for name in ours:
        layout_name, cls = layouts.LAYOUTS[name]
        quant_ops.register_layout_class(layout_name, cls)
        quant_ops.QUANT_ALGOS[name] = {
            "storage_t": format_for(name, 1).code_dtype,
            "parameters": {"weight_scale"},
            "comfy_tensor_layout": layout_name,
            # Activations are quantized inside the layout's linear (kernel path), not by
            # ComfyUI's generic input quantization.
            "quantize_input": False,
        }
    for name in theirs:
        logger.info("comfyui-quantizer: ComfyUI already implements %s; using its own code", name)
    logger.info(
        "comfyui-quantizer: pack-only formats registered with ComfyUI: %s",
        ", ".join(sorted(handled)) or "none",
    )
    return RuntimeStatus(registered=tuple(sorted(handled)), left_to_comfyui=tuple(theirs))


def _unwrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """ComfyUI's function under our own earlier wrapper (another pack's wrapper is kept)."""
    return fn.__wrapped__ if hasattr(fn, _WRAPPED_MARK) else fn  # type: ignore[attr-defined]


def _layer_format(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    conf = state_dict.get(f"{prefix}comfy_quant")
    if conf is None:
        return None
    try:
        settings = json.loads(conf.cpu().numpy().tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # ComfyUI's own loader reports it
    return settings if isinstance(settings, dict) else None


def _wrap_load(original: Callable[..., Any], formats: frozenset[str]) -> Callable[..., Any]:
    def load_quantized_module(
        module, super_load, state_dict, prefix, local_metadata, strict,
        missing_keys, unexpected_keys, error_msgs, load_extra_params=False,
    ):  # fmt: skip
        settings = _layer_format(state_dict, prefix)
        if settings is None or settings.get("format") not in formats:
            return original(
                module, super_load, state_dict, prefix, local_metadata, strict,
                missing_keys, unexpected_keys, error_msgs, load_extra_params=load_extra_params,
            )  # fmt: skip
        loaded = _load_pack_layer(module, state_dict, prefix, settings)
        super_load(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key in loaded:
            if key in missing_keys:
                missing_keys.remove(key)
        return None

    load_quantized_module.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(load_quantized_module, _WRAPPED_MARK, formats)
    return load_quantized_module


def _load_pack_layer(
    module: Any, state_dict: dict[str, Any], prefix: str, settings: dict[str, Any]
) -> list[str]:
    """Pop one pack-format layer from ``state_dict`` into ``module.weight``; the keys it used.

    Mirrors what ComfyUI's own loader leaves on the module (``quant_format``, ``layout_type``,
    ``_full_precision_mm[_config]``) so that its forward, LoRA and save paths work unchanged.
    """
    import torch
    from comfy.quant_ops import QuantizedTensor

    from . import layouts

    layer = prefix.rstrip(".")
    name = settings["format"]
    layout_name, layout_cls = layouts.LAYOUTS[name]
    keys = {s: f"{prefix}{s}" for s in ("weight", "weight_scale", "comfy_quant")}
    if keys["weight"] not in state_dict:
        raise ValueError(f"layer {layer}: {name} layer has no weight")
    if keys["weight_scale"] not in state_dict:
        raise ValueError(f"layer {layer}: {name} layer has no weight_scale")
    try:
        fmt = format_for(name, settings.get("group_size"))
    except ValueError as exc:
        raise ValueError(f"layer {layer}: {exc}") from None
    device = module.factory_kwargs["device"]
    compute_dtype = module.factory_kwargs["dtype"]
    weight = state_dict.pop(keys["weight"])
    scale = state_dict.pop(keys["weight_scale"]).to(device=device, dtype=torch.float32)
    state_dict.pop(keys["comfy_quant"])
    if weight.dtype == torch.uint8 and fmt.code_dtype == torch.float8_e4m3fn:
        weight = weight.view(torch.float8_e4m3fn)  # FP8 stored as raw bytes
    try:
        check_layer(weight, scale, fmt)
    except ValueError as exc:
        raise ValueError(f"layer {layer}: {exc}") from None
    if tuple(weight.shape) != tuple(module._orig_shape):
        raise ValueError(
            f"layer {layer}: weight {list(weight.shape)} does not match the model's "
            f"{list(module._orig_shape)}"
        )

    module.quant_format = name
    module._full_precision_mm_config = bool(settings.get("full_precision_matrix_mult", False))
    if not module._full_precision_mm:
        module._full_precision_mm = module._full_precision_mm_config
    if name in module._disabled_formats:
        module._full_precision_mm = True
    module.layout_type = layout_name
    params = layout_cls.Params(
        scale=scale,
        orig_dtype=compute_dtype,
        orig_shape=tuple(module._orig_shape),
        block_size=fmt.block_size,
        full_precision=bool(module._full_precision_mm),
    )
    module.weight = torch.nn.Parameter(
        QuantizedTensor(weight.to(device=device), layout_name, params), requires_grad=False
    )
    return list(keys.values())


def _wrap_save(original: Callable[..., Any], formats: frozenset[str]) -> Callable[..., Any]:
    def quantized_weight_state_dict(
        module, sd, prefix, extra_quant_conf=None, extra_quant_params=()
    ):
        if getattr(module, "quant_format", None) in formats:
            block = getattr(getattr(module.weight, "_params", None), "block_size", None)
            if block is not None:
                extra_quant_conf = {**(extra_quant_conf or {}), "group_size": block}
        return original(
            module, sd, prefix, extra_quant_conf=extra_quant_conf,
            extra_quant_params=extra_quant_params,
        )  # fmt: skip

    quantized_weight_state_dict.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(quantized_weight_state_dict, _WRAPPED_MARK, formats)
    return quantized_weight_state_dict
