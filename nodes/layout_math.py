"""Runtime math of the pack-only formats, in plain PyTorch (no ComfyUI, no comfy-kitchen).

The pack-only formats are the ones stock ComfyUI cannot load (``Format.stock_loadable`` is
false): ``int8_blockwise``, ``float8_e4m3fn_rowwise`` and ``float8_e4m3fn_blockwise``. Their
on-disk layout is specified by :mod:`..quant_core.formats` and :mod:`..quant_core.comfy_quant`:
codes ``[out, in]`` (I8 / F8_E4M3) and an F32 dequantization factor ``weight_scale`` of shape
``[out, 1]`` (row) or ``[ceil(out/B), ceil(in/B)]`` (block, padded grid).

Two ways to run a linear layer on such a weight:

- **kernel** (block formats on CUDA, through ``quant_core.dispatch.block_scaled_linear``):
  activations are quantized per ``1 x B`` on the fly and the block scales applied per K-block
  in fp32 (W8A8); row-scaled FP8 has no kernel yet;
- **dequantize** (everywhere else, and for layers marked ``full_precision_matrix_mult``): the
  weight is rebuilt exactly (``codes * scale`` in fp32, then the compute dtype) and multiplied
  in the compute dtype. This is the reference the e2e tests compare against.

The ComfyUI layouts (:mod:`.layouts`) and the GPU benchmark both call :func:`linear`, so the
kernel plugs in at exactly one place.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..quant_core.dispatch import block_scaled_linear, choose_block_linear
from ..quant_core.formats import Format, Kind, Scaling, dequantize, quantize, quantize_with_scale

logger = logging.getLogger("comfyui_quantizer.runtime")

# comfy_quant format name -> (kind, scaling) of every format that needs the pack to load.
PACK_FORMATS: dict[str, tuple[Kind, Scaling]] = {
    "int8_blockwise": (Kind.INT8, Scaling.BLOCK),
    "float8_e4m3fn_rowwise": (Kind.FP8, Scaling.ROW),
    "float8_e4m3fn_blockwise": (Kind.FP8, Scaling.BLOCK),
}

# comfy_quant format name -> the comfy-kitchen layout name the pack registers for it.
LAYOUT_NAMES: dict[str, str] = {
    "int8_blockwise": "CQInt8BlockwiseLayout",
    "float8_e4m3fn_rowwise": "CQFloat8RowwiseLayout",
    "float8_e4m3fn_blockwise": "CQFloat8BlockwiseLayout",
}


def format_for(name: str, group_size: int | None) -> Format:
    """The :class:`Format` of a pack-only ``comfy_quant`` entry (``group_size`` = block edge B).

    Raises ``ValueError`` for an unknown name, or a block format without a positive group size.
    """
    if name not in PACK_FORMATS:
        raise ValueError(f"{name!r} is not a pack-only format ({', '.join(PACK_FORMATS)})")
    kind, scaling = PACK_FORMATS[name]
    if scaling is Scaling.BLOCK:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(
                f"{name} needs a positive integer 'group_size' in comfy_quant, got {group_size!r}"
            )
        return Format(kind, scaling, group_size)
    return Format(kind, scaling)


def check_layer(codes: torch.Tensor, scale: torch.Tensor, fmt: Format) -> None:
    """Raise ``ValueError`` unless ``codes`` ``[out, in]`` and ``scale`` fit ``fmt``."""
    if codes.dim() != 2:
        raise ValueError(f"{fmt.name} needs a 2-D weight [out, in], got {tuple(codes.shape)}")
    if codes.dtype != fmt.code_dtype:
        raise ValueError(f"{fmt.name} stores {fmt.code_dtype} codes, got {codes.dtype}")
    want = fmt.scale_shape(tuple(codes.shape))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"{fmt.name} weight {list(codes.shape)} needs weight_scale of shape {list(want)}, "
            f"got {list(scale.shape)}"
        )


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, fmt: Format, dtype: torch.dtype
) -> torch.Tensor:
    """``codes [out, in] * scale`` in fp32, then ``dtype``: same values as ``formats.dequantize``.

    When the blocks tile the weight exactly the scale is broadcast over a ``[gr, B, gc, B]``
    view instead of being expanded to ``[out, in]``; the products are the same fp32 products.
    """
    out_features, in_features = codes.shape
    b = fmt.block_size
    if fmt.scaling is Scaling.BLOCK and b and out_features % b == 0 and in_features % b == 0:
        gr, gc = out_features // b, in_features // b
        tiles = codes.float().view(gr, b, gc, b) * scale.float().view(gr, 1, gc, 1)
        return tiles.view(out_features, in_features).to(dtype)
    return dequantize(codes, scale, fmt, dtype)


def requantize(
    w: torch.Tensor, fmt: Format, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes of ``w [out, in]`` (``scale=None``: absmax scale) and the scale."""
    if scale is None:
        return quantize(w, fmt)
    scale = scale.to(device=w.device, dtype=torch.float32)
    return quantize_with_scale(w, scale, fmt), scale


def linear_backend(
    x: torch.Tensor, codes: torch.Tensor, fmt: Format, *, full_precision: bool = False
) -> str:
    """``"kernel"`` or ``"dequantize"``: what :func:`linear` runs for these operands.

    The kernel is used for block formats on CUDA, unless the layer is full precision or the
    dispatcher would only offer its PyTorch reference (which simulates the kernel's activation
    quantization and is slower than dequantizing; the dispatcher logs why once).
    """
    if full_precision or x.device.type != "cuda" or fmt.scaling is not Scaling.BLOCK:
        return "dequantize"
    if choose_block_linear(x, codes, fmt).backend == "torch":
        return "dequantize"
    return "kernel"


@functools.lru_cache(maxsize=64)
def _note_kernel_failure(
    label: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], error: str
) -> None:
    logger.warning(
        "comfyui-quantizer: block-scaled GEMM failed for %s x %s @ %s (%s); this layer runs on "
        "the exact dequantize path",
        label,
        list(x_shape),
        list(w_shape),
        error.splitlines()[0][:300],
    )


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    full_precision: bool = False,
) -> torch.Tensor:
    """``x [..., in] @ W.T + bias -> [..., out]`` in ``out_dtype``, ``W = codes * scale``.

    :func:`linear_backend` picks the block-scaled GEMM kernel or the exact dequantize path
    (computed in ``x.dtype``). A kernel call that raises (e.g. a cuBLAS backend refusing a
    shape) falls back to the dequantize path, with one warning per shape and error.
    """
    if linear_backend(x, codes, fmt, full_precision=full_precision) == "kernel":
        x2 = x.reshape(-1, x.shape[-1])
        try:
            y = block_scaled_linear(x2, codes, scale, fmt, bias, out_dtype)
        except RuntimeError as exc:  # a backend refusing a shape must not stop sampling
            _note_kernel_failure(fmt.label, tuple(x2.shape), tuple(codes.shape), str(exc))
        else:
            return y.reshape(*x.shape[:-1], codes.shape[0])
    w = dequantize_weight(codes, scale, fmt, x.dtype)
    b = bias.to(x.dtype) if bias is not None else None
    return torch.nn.functional.linear(x, w, b).to(out_dtype)
