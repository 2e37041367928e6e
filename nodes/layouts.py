"""comfy-kitchen tensor layouts for the pack-only formats (imports comfy_kitchen, never ComfyUI).

ComfyUI keeps a quantized weight as comfy-kitchen's ``QuantizedTensor``: the codes plus a
frozen ``Params`` dataclass, tagged with a layout name. Every aten op on it is looked up in
comfy-kitchen's layout op table; unknown ops dequantize and run in float. This module defines
one layout per pack-only format and the ops a linear layer needs:

=========================  ==============================  ==========================
format (``comfy_quant``)   layout name                     ``Params.scale``
=========================  ==============================  ==========================
``int8_blockwise``         ``CQInt8BlockwiseLayout``       ``[ceil(out/B), ceil(in/B)]``
``float8_e4m3fn_rowwise``  ``CQFloat8RowwiseLayout``       ``[out, 1]``
``float8_e4m3fn_blockwise`` ``CQFloat8BlockwiseLayout``    ``[ceil(out/B), ceil(in/B)]``
=========================  ==============================  ==========================

``aten.linear`` (what ``F.linear`` becomes under ``torch.inference_mode``) and its
decomposition ``aten.t`` + ``aten.mm`` / ``aten.addmm`` (outside inference mode) run
:func:`.layout_math.linear`. Re-quantization after a LoRA patch (ComfyUI's ``set_weight`` ->
``requantize_from_float``) is round-to-nearest with a fresh absmax scale in the same format.
Works with comfy-kitchen 0.2.31 (ComfyUI's pin at the time of writing) through 0.2.40.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from comfy_kitchen.tensor import (
    BaseLayoutParams,
    QuantizedLayout,
    QuantizedTensor,
    dequantize_args,
    get_layout_class,
    register_layout_class,
    register_layout_op,
)

from ..quant_core.formats import Format, Kind, Scaling
from . import layout_math

logger = logging.getLogger("comfyui_quantizer.runtime")


@functools.lru_cache(maxsize=1)
def _note_stochastic_rounding_ignored() -> None:
    logger.info(
        "comfyui-quantizer: ComfyUI asked for stochastic rounding when re-quantizing a pack-only "
        "layer (LoRA patch); these layouts re-quantize with round-to-nearest"
    )


class PackLayout(QuantizedLayout):
    """Base of the pack-only layouts: codes ``[out, in]`` + an F32 row or block scale."""

    FORMAT: ClassVar[str] = ""
    KIND: ClassVar[Kind]
    SCALING: ClassVar[Scaling]

    @dataclass(frozen=True)
    class Params(BaseLayoutParams):
        """``scale`` (F32, shape of ``Format.scale_shape``), ``orig_dtype``, ``orig_shape``.

        ``block_size`` is B for block formats (None for rows); ``full_precision`` keeps the
        layer on the dequantize path (``full_precision_matrix_mult``); ``transposed`` marks the
        logical transpose ``aten.t`` produces (storage stays ``[out, in]``).
        """

        block_size: int | None = None
        full_precision: bool = False
        transposed: bool = False

    @classmethod
    def format(cls, params: PackLayout.Params) -> Format:
        return layout_math.format_for(cls.FORMAT, params.block_size)

    @classmethod
    def quantize(
        cls,
        tensor: torch.Tensor,
        scale: torch.Tensor | str | None = None,
        stochastic_rounding: int | None = 0,
        inplace_ops: bool = False,
        block_size: int | None = None,
        full_precision: bool = False,
    ) -> tuple[torch.Tensor, PackLayout.Params]:
        """``[out, in]`` float -> codes, Params. ``scale`` None/"recalculate": absmax scale.

        ``stochastic_rounding`` and ``inplace_ops`` are accepted because ComfyUI passes them
        when it re-quantizes a patched weight; rounding is always to nearest (logged once).
        """
        if tensor.dim() != 2:
            raise ValueError(f"{cls.FORMAT} quantizes 2-D weights, got {tuple(tensor.shape)}")
        if stochastic_rounding:
            _note_stochastic_rounding_ignored()
        fmt = layout_math.format_for(cls.FORMAT, block_size)
        given = scale if isinstance(scale, torch.Tensor) else None
        codes, new_scale = layout_math.requantize(tensor, fmt, given)
        params = cls.Params(
            scale=new_scale,
            orig_dtype=tensor.dtype,
            orig_shape=tuple(tensor.shape),
            block_size=fmt.block_size,
            full_precision=full_precision,
        )
        return codes, params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: PackLayout.Params) -> torch.Tensor:
        """Codes (storage ``[out, in]``) -> ``codes * scale`` in ``params.orig_dtype``."""
        fmt = cls.format(params)
        return layout_math.dequantize_weight(qdata, params.scale, fmt, params.orig_dtype)

    @classmethod
    def get_plain_tensors(cls, qtensor: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qtensor._qdata, qtensor._params.scale

    @classmethod
    def state_dict_tensors(
        cls, qdata: torch.Tensor, params: PackLayout.Params
    ) -> dict[str, torch.Tensor]:
        """Suffixes of the checkpoint keys: ``weight`` (codes) and ``weight_scale``."""
        return {"": qdata, "_scale": params.scale}

    @classmethod
    def requantize_kwargs(cls, qtensor: QuantizedTensor) -> dict[str, Any]:
        params = qtensor._params
        return {"block_size": params.block_size, "full_precision": params.full_precision}


class Int8BlockwiseLayout(PackLayout):
    FORMAT = "int8_blockwise"
    KIND = Kind.INT8
    SCALING = Scaling.BLOCK


class Float8RowwiseLayout(PackLayout):
    FORMAT = "float8_e4m3fn_rowwise"
    KIND = Kind.FP8
    SCALING = Scaling.ROW


class Float8BlockwiseLayout(PackLayout):
    FORMAT = "float8_e4m3fn_blockwise"
    KIND = Kind.FP8
    SCALING = Scaling.BLOCK


# comfy_quant format name -> (layout name registered with comfy-kitchen, layout class).
LAYOUTS: dict[str, tuple[str, type[PackLayout]]] = {
    cls.FORMAT: (layout_math.LAYOUT_NAMES[cls.FORMAT], cls)
    for cls in (Int8BlockwiseLayout, Float8RowwiseLayout, Float8BlockwiseLayout)
}


def register_with_kitchen() -> None:
    """Register the layout classes by name and their aten ops with comfy-kitchen (idempotent)."""
    for name, cls in LAYOUTS.values():
        register_layout_class(name, cls)
    register_layout_op(torch.ops.aten.linear.default, PackLayout)(_handle_linear)
    register_layout_op(torch.ops.aten.t.default, PackLayout)(_handle_t)
    register_layout_op(torch.ops.aten.mm.default, PackLayout)(_handle_mm)
    register_layout_op(torch.ops.aten.addmm.default, PackLayout)(_handle_addmm)


def is_pack_weight(t: object) -> bool:
    """Whether ``t`` is a ``QuantizedTensor`` in one of this module's layouts."""
    return isinstance(t, QuantizedTensor) and issubclass(
        get_layout_class(t._layout_cls), PackLayout
    )


def _run_linear(
    x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None
) -> torch.Tensor:
    layout = get_layout_class(weight._layout_cls)
    params = weight._params
    if isinstance(x, QuantizedTensor):
        x = x.dequantize()
    return layout_math.linear(
        x,
        weight._qdata,
        params.scale,
        layout.format(params),
        bias,
        x.dtype,
        full_precision=params.full_precision,
    )


def _handle_linear(qt: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """``aten.linear(x, W[, bias])`` with ``W`` in a pack layout (storage ``[out, in]``)."""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not is_pack_weight(weight) or weight._params.transposed or is_pack_weight(bias):
        return torch.nn.functional.linear(*dequantize_args(args), **dequantize_args(kwargs))
    return _run_linear(x, weight, bias)


def _handle_t(qt: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    """Logical transpose: flip ``transposed`` and swap ``orig_shape``; codes stay ``[out, in]``."""
    src = args[0]
    old = src._params
    params = dataclasses.replace(
        old, orig_shape=(old.orig_shape[1], old.orig_shape[0]), transposed=not old.transposed
    )
    return QuantizedTensor(src._qdata, src._layout_cls, params)


def _handle_mm(qt: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """``aten.mm(x, W.t())`` (``F.linear`` outside inference mode) -> the layer's linear."""
    x, rhs = args[0], args[1]
    if is_pack_weight(rhs) and rhs._params.transposed and not is_pack_weight(x):
        return _run_linear(x, rhs, None)
    return torch.mm(*dequantize_args(args), **dequantize_args(kwargs))


def _handle_addmm(qt: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """``aten.addmm(bias, x, W.t())`` with unit ``beta``/``alpha`` -> the layer's linear."""
    bias, x, rhs = args[0], args[1], args[2]
    unit = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
    plain_operands = not is_pack_weight(x) and not is_pack_weight(bias)
    if unit and plain_operands and is_pack_weight(rhs) and rhs._params.transposed:
        return _run_linear(x, rhs, bias)
    return torch.addmm(*dequantize_args(args), **dequantize_args(kwargs))
