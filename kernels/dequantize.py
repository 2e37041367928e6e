"""Fused dequantize kernel: ``codes * scale`` in float32, rounded once to the output dtype.

Mirrors ``quant_core.formats.dequantize`` bit for bit, for tensor, row and ``B x B`` block
scales. Memory traffic for an ``[R, C]`` weight to bf16: R·C bytes read + 2·R·C written.

bf16 output is rounded to nearest-even with integer arithmetic on the float32 bits before the
(then exact) cast, because Triton's interpreter truncates float32 -> bf16 casts; on a GPU the
result is the same as the hardware's RNE cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SCALING_IDS = {"tensor": 0, "row": 1, "block": 2}
_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _dequantize_kernel(
    codes_ptr,
    scale_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_c,
    stride_o,
    stride_s_row,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    SCALING: tl.constexpr,
    BLOCK: tl.constexpr,
    OUT: tl.constexpr,
):
    """One ``TILE_R x TILE_C`` tile; for block scales ``TILE_C`` divides ``BLOCK``."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * TILE_R + tl.arange(0, TILE_R)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    # No ``other``: masked lanes are never stored (and an FP8 ``other`` cannot be spelled).
    x = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=mask).to(tl.float32)
    if SCALING == 0:
        y = x * tl.load(scale_ptr)
    elif SCALING == 1:
        s = tl.load(scale_ptr + rows * stride_s_row, mask=row_ok, other=1.0)
        y = x * s[:, None]
    else:
        col_block = (pid_c * TILE_C) // BLOCK
        s = tl.load(scale_ptr + (rows // BLOCK) * stride_s_row + col_block, mask=row_ok, other=1.0)
        y = x * s[:, None]
    if OUT == 1:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
        out = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    elif OUT == 2:
        out = y.to(tl.float16)
    else:
        out = y
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=mask)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, fmt: object, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Codes ``[out, in]`` and scale -> ``codes * scale`` as ``dtype`` ``[out, in]``.

    ``dtype`` is float32, bfloat16 or float16; codes int8 or float8_e4m3fn.
    """
    rows, cols = codes.shape
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    scale = scale.float()
    if scale.dim() == 2 and scale.stride(1) != 1:
        scale = scale.contiguous()
    scaling = str(getattr(fmt.scaling, "value", fmt.scaling))  # type: ignore[attr-defined]
    block = int(fmt.block_size) if scaling == "block" else 1  # type: ignore[attr-defined]
    tile_c = min(128, block) if scaling == "block" else 256
    tile_r = max(1, 8192 // tile_c)
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(rows, tile_r), triton.cdiv(cols, tile_c))
    _dequantize_kernel[grid](
        codes, scale, out, rows, cols, codes.stride(0), out.stride(0),
        scale.stride(0) if scale.dim() == 2 else 0,
        TILE_R=tile_r, TILE_C=tile_c, SCALING=_SCALING_IDS[scaling], BLOCK=block,
        OUT=_OUT_DTYPES[dtype], num_warps=8,
    )  # fmt: skip
    return out
