"""Triton kernel: the sequential part of GPTQ-style error feedback inside one column block.

Reference: ``quant_core.error_feedback._block_reference`` (same arguments, same function).
For each column ``k`` of a block: scaled value ``x = t_k / s_k`` of the target ``t`` (the
weight plus the feedback received so far), code ``q = round_to_grid(x)``, error
``e = w_k − q·s_k``, then every later column of the block takes ``t_j += e · Ū_kj``. Rows are
independent, so each program owns ``BLOCK_R`` rows of one layer and walks the block's columns
in registers: the block is read once and codes, pre-rounding values and errors are written once
(``5·out·B`` floats per block); the sequential steps cost no launch and no memory round trip.

Rounding is done in float32 arithmetic (no FP8 cast: Triton's interpreter does not round it to
nearest-even): ``rint`` by the ``1.5·2²³`` trick (exact for ``|x| < 2²²``; values are clamped
to ±127/±448 first) and the E4M3 grid spacing from the float32 exponent bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(x):
    # adding and subtracting 1.5 * 2**23 rounds a float32 half to even (|x| < 2**22)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _round_grid(x, FP8: tl.constexpr):
    if FP8:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        bits = x.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) - 127  # floor(log2|x|) for normal x
        # spacing 2**(e-3) for 3 mantissa bits; subnormals (|x| < 2**-6) 2**-9
        step_exp = tl.maximum(exponent, -6) - 3
        step = ((step_exp + 127) << 23).to(tl.float32, bitcast=True)
        return _rint(x / step) * step
    return _rint(tl.minimum(tl.maximum(x, -127.0), 127.0))


@triton.jit
def _gptq_block_kernel(
    t_ptr, w_ptr, s_ptr, u_ptr, q_ptr, p_ptr, e_ptr,
    rows, width,
    st_l, st_r, st_c,
    sw_l, sw_r, sw_c,
    ss_l, ss_r, ss_c,
    su_l, su_r, su_c,
    so_l, so_r, so_c,
    se_l, se_r, se_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    layer = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < width)[None, :]
    rc_t = layer * st_l + r[:, None] * st_r + c[None, :] * st_c
    t = tl.load(t_ptr + rc_t, mask=mask, other=0.0)
    w = tl.load(w_ptr + layer * sw_l + r[:, None] * sw_r + c[None, :] * sw_c, mask=mask, other=0.0)
    s = tl.load(s_ptr + layer * ss_l + r[:, None] * ss_r + c[None, :] * ss_c, mask=mask, other=1.0)
    codes = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    pre = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    err = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    u_base = u_ptr + layer * su_l
    for k in range(width):
        here = c[None, :] == k
        x = tl.sum(tl.where(here, t, 0.0), axis=1)
        wk = tl.sum(tl.where(here, w, 0.0), axis=1)
        sk = tl.sum(tl.where(here, s, 0.0), axis=1)
        scaled = tl.math.div_rn(x, sk)  # IEEE division, as PyTorch (the default is approximate)
        q = _round_grid(scaled, FP8)
        e = wk - q * sk
        u_row = tl.load(u_base + k * su_r + c * su_c, mask=(c > k) & (c < width), other=0.0)
        t = t + e[:, None] * u_row[None, :]
        codes = tl.where(here, q[:, None], codes)
        pre = tl.where(here, scaled[:, None], pre)
        err = tl.where(here, e[:, None], err)
    out = layer * so_l + r[:, None] * so_r + c[None, :] * so_c
    tl.store(q_ptr + out, codes, mask=mask)
    tl.store(p_ptr + out, pre, mask=mask)
    tl.store(e_ptr + layer * se_l + r[:, None] * se_r + c[None, :] * se_c, err, mask=mask)


def gptq_block(
    target: torch.Tensor,
    wb: torch.Tensor,
    sb: torch.Tensor,
    ub: torch.Tensor,
    kind: str,
    codes: torch.Tensor,
    pre: torch.Tensor,
) -> torch.Tensor:
    """Feedback inside one block: ``target``/``wb [L, out, B]`` (read only), ``sb``
    broadcastable to them, ``ub [L, B, B]``; writes ``codes``/``pre`` (``[L, out, B]`` views
    with equal strides) and returns the errors ``w − ŵ`` (float32, contiguous). ``B`` ≤ 256.
    """
    layers, rows, width = wb.shape
    if width > 256:
        raise ValueError(f"block width {width} > 256")
    if codes.stride() != pre.stride():
        raise ValueError("codes and pre must have the same strides")
    s = sb.float().expand(layers, rows, width)
    err = torch.empty(layers, rows, width, dtype=torch.float32, device=wb.device)
    block_c = max(16, triton.next_power_of_2(width))
    block_r = 16
    grid = (triton.cdiv(rows, block_r), layers)
    _gptq_block_kernel[grid](
        target, wb, s, ub, codes, pre, err,
        rows, width,
        *target.stride(), *wb.stride(), *s.stride(), *ub.stride(), *codes.stride(), *err.stride(),
        BLOCK_R=block_r, BLOCK_C=block_c, FP8=(kind == "fp8"), num_warps=4,
    )  # fmt: skip
    return err
