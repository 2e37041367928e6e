"""Fused quantize kernels: absmax -> scale -> round-half-even -> saturate -> codes, in one pass.

Launchers mirror ``quant_core.formats.quantize`` (same signature, bit-identical codes and scales):

- per-row (FP8, INT8): one program per row, two sweeps over the row; the second sweep reads
  the row back from L2 (a row is at most a few tens of KB), so DRAM sees the row once.
- per-block ``B x B`` (FP8, INT8) and per ``1 x B`` (activations): one program per tile held in
  registers; a single DRAM read of the input and a single write of codes and scales.
- per-tensor (FP8, INT8): an absmax pass, then a quantize pass (the amax of the whole tensor
  must be known before the first code). The quantize pass walks the tensor backwards, so its
  first reads hit what the absmax pass left in L2.

Memory traffic, bf16 weight ``[R, C]``: 2·R·C bytes read + R·C written (+ scales), i.e. 3 bytes
per element, the floor for an I/O-bound conversion; per-tensor reads up to 2 bytes more.

Exactness: the math is the reference's, in float32: ``scale = amax / qmax`` with IEEE division
(``div_rn``), ``w / scale`` correctly rounded (reciprocal + two exact FMA corrections, cheaper
than a division per element), round-half-to-even by adding a power of two, and FP8 values put
on the E4M3 grid *before* the cast (Triton's interpreter does not round FP8 casts to
nearest-even; on the grid every cast is exact). NaN/Inf propagate into the scale, so the
caller sees a non-finite scale and raises like the reference.

Cost: 3 bytes per element at ~3.8 TB/s leaves ~25 instructions per element on an H200, so
the per-element math matters (a per-element IEEE division alone was half of that budget).
Measured on an H200 (bench/KERNELS_NOTES.md): 57-77 % of a device-to-device copy for row and
block scales, 42-54 % for per-tensor (two passes), dequantize 85-88 %.

Nothing is compiled at import; each kernel compiles on first launch for its constexprs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_FP8_MAX = 448.0
_INT8_MAX = 127.0


@triton.jit
def _abs_bits(x):
    """Bits of |x| as int32: for non-negative floats integer order is float order, and NaN and
    Inf lie above every finite value, so an integer max flags them (and costs no more)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _absmax(x, axis):
    """Largest |x| along ``axis`` (float32 ``x``); NaN/Inf come out as NaN/Inf."""
    return tl.max(_abs_bits(x), axis).to(tl.float32, bitcast=True)


@triton.jit
def _scale_from_amax(amax, QMAX: tl.constexpr):
    """``amax / qmax`` (IEEE), 1.0 for an all-zero group, never below the smallest normal.
    A NaN/Inf amax stays non-finite (the caller raises)."""
    s = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, QMAX))
    return tl.where(s < 1.1754943508222875e-38, 1.1754943508222875e-38, s)  # keeps NaN


@triton.jit
def _division_setup(scale):
    """Per-group constants for ``_encode``: ``k`` lifts a tiny group (below 2**-60, i.e. fp32
    subnormal values) by 2**64 so that the residuals in ``_encode`` stay exact, and
    ``inv = RN(1 / (scale * k))``. (Branch-free on purpose: FP8 codes yielded out of a
    runtime ``if`` came out wrong on an H200 with Triton 3.6; see bench/KERNELS_NOTES.md.)"""
    k = tl.where(scale < 8.673617379884035e-19, 18446744073709551616.0, 1.0)
    return k, scale * k, tl.math.div_rn(1.0, scale * k)


@triton.jit
def _encode(x, k, s, inv, FP8: tl.constexpr, SIGN_FROM_X: tl.constexpr):
    """float32 ``x / scale`` rounded onto the code grid, as codes (int8 or e4m3).

    ``x / scale`` is the IEEE quotient without a division per element: with ``xs = x * k``
    (exact), ``q = xs * inv`` is within 2 ulp, one exact-residual FMA correction makes it
    faithful, a second one correctly rounded (Markstein). ``|q| <= qmax * (1 + 2**-23)``
    because ``|x| <= amax`` and ``scale = RN(amax / qmax)``, so INT8 needs no clamp.
    """
    xs = x * k
    q = xs * inv
    q = tl.fma(tl.fma(-q, s, xs), inv, q)
    q = tl.fma(tl.fma(-q, s, xs), inv, q)
    if FP8:
        # Round onto the E4M3 grid in float32: the spacing around |q| = 1.m * 2**e is
        # 2**(e-3) (at least 2**-9, subnormals); as biased exponents step = max(E - 3, 118).
        # |q| / step < 2**5 is exact and so is the 1.5*2**23 rounding trick on it.
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        bits = q.to(tl.int32, bitcast=True)
        mag_bits = bits & 0x7FFFFFFF
        step_e = tl.maximum((mag_bits >> 23) - 3, 118)
        step = (step_e << 23).to(tl.float32, bitcast=True)
        inv_step = ((254 - step_e) << 23).to(tl.float32, bitcast=True)
        mag = mag_bits.to(tl.float32, bitcast=True)
        r = ((mag * inv_step + 12582912.0) - 12582912.0) * step
        # The sign of x: the corrections turn a -0.0 input into q = +0.0.
        sign_src = x.to(tl.int32, bitcast=True) if SIGN_FROM_X else bits
        r_bits = r.to(tl.int32, bitcast=True) | (sign_src & -2147483648)
        return r_bits.to(tl.float32, bitcast=True).to(tl.float8e4nv)
    else:
        # q + 1.5*2**23 rounds half-to-even; the integer sits in the low mantissa bits and the
        # low byte of 0x4B400000 is zero, so the low byte is the int8 code.
        return (q + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _absmax_atomic_kernel(x_ptr, amax_bits_ptr, n, BLOCK: tl.constexpr):
    """Pass 1 of per-tensor scaling: atomic max of |x| bits over the whole flat tensor."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.atomic_max(amax_bits_ptr, tl.max(_abs_bits(x), 0))


@triton.jit
def _quantize_tensor_kernel(
    x_ptr, codes_ptr, amax_bits_ptr, scale_ptr, n, BLOCK: tl.constexpr, FP8: tl.constexpr,
    QMAX: tl.constexpr, SIGN_FROM_X: tl.constexpr,
):  # fmt: skip
    """Pass 2: every program derives the same scale from the amax; the first one stores it.
    Programs run back to front, so the first reads hit what pass 1 left in L2."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    scale = _scale_from_amax(tl.load(amax_bits_ptr).to(tl.float32, bitcast=True), QMAX)
    tl.store(scale_ptr, scale, mask=pid == 0)
    k, s, inv = _division_setup(scale)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(codes_ptr + offs, _encode(x, k, s, inv, FP8, SIGN_FROM_X), mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    n_cols,
    stride_x,
    stride_c,
    BLOCK_C: tl.constexpr,
    FP8: tl.constexpr,
    QMAX: tl.constexpr,
    SIGN_FROM_X: tl.constexpr,
):
    """One row per program: absmax sweep, scale, then a quantize sweep (row re-read from L2)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    c_row = codes_ptr + row * stride_c
    cols = tl.arange(0, BLOCK_C)
    amax_bits = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
        amax_bits = tl.maximum(amax_bits, _abs_bits(x))
    scale = _scale_from_amax(tl.max(amax_bits, 0).to(tl.float32, bitcast=True), QMAX)
    tl.store(scale_ptr + row, scale)
    k, s, inv = _division_setup(scale)
    for start in range(0, n_cols, BLOCK_C):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_row + start + cols, _encode(x, k, s, inv, FP8, SIGN_FROM_X), mask=mask)


@triton.jit
def _quantize_groups_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_c,
    stride_s_row,
    stride_s_col,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    PER_ROW: tl.constexpr,
    FP8: tl.constexpr,
    QMAX: tl.constexpr,
    SIGN_FROM_X: tl.constexpr,
):
    """One ``TILE_R x TILE_C`` tile per program, held in registers.

    ``PER_ROW``: each row of the tile is a ``1 x TILE_C`` group (activations, scale index
    ``[row, col_block]``); else the whole tile is one group (weights, ``[row_block, col_block]``).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * TILE_R + tl.arange(0, TILE_R)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if PER_ROW:
        scale = _scale_from_amax(_absmax(x, 1), QMAX)
        tl.store(scale_ptr + rows * stride_s_row + pid_c * stride_s_col, scale, mask=rows < n_rows)
        k, s, inv = _division_setup(scale)
        codes = _encode(x, k[:, None], s[:, None], inv[:, None], FP8, SIGN_FROM_X)
    else:
        scale = _scale_from_amax(
            tl.max(tl.max(_abs_bits(x), 1), 0).to(tl.float32, bitcast=True), QMAX
        )
        tl.store(scale_ptr + pid_r * stride_s_row + pid_c * stride_s_col, scale)
        k, s, inv = _division_setup(scale)
        codes = _encode(x, k, s, inv, FP8, SIGN_FROM_X)
    tl.store(codes_ptr + rows[:, None] * stride_c + cols[None, :], codes, mask=mask)


def _is_fp8(fmt: object) -> bool:
    return str(getattr(fmt.kind, "value", fmt.kind)) == "fp8"  # type: ignore[attr-defined]


def _scaling(fmt: object) -> str:
    return str(getattr(fmt.scaling, "value", fmt.scaling))  # type: ignore[attr-defined]


def _code_dtype(fp8: bool) -> torch.dtype:
    return torch.float8_e4m3fn if fp8 else torch.int8


def _row_block(cols: int) -> int:
    """Chunk of a row per loop step: the largest power of two in [512, 4096] dividing ``cols``
    (no masked lanes), else 2048."""
    for block in (4096, 2048, 1024, 512):
        if cols % block == 0:
            return block
    return min(2048, triton.next_power_of_2(max(cols, 16)))


def quantize(
    w: torch.Tensor,
    fmt: object,
    *,
    num_warps: int | None = None,
    block_c: int | None = None,
    sign_from_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``[out, in]`` -> codes ``[out, in]``, scale F32 in ``fmt.scale_shape``.

    Same contract as ``formats.quantize`` except that a NaN/Inf input gives a non-finite scale
    instead of raising (the dispatcher checks and raises). ``w``: bf16/fp16/fp32, 2-D. The
    keyword-only parameters override launch shape and FP8 sign source (benchmarks only).
    """
    fp8 = _is_fp8(fmt)
    qmax = _FP8_MAX if fp8 else _INT8_MAX
    rows, cols = w.shape
    if w.stride(1) != 1:
        w = w.contiguous()
    codes = torch.empty(rows, cols, dtype=_code_dtype(fp8), device=w.device)
    scaling = _scaling(fmt)
    if scaling == "tensor":
        return _quantize_tensor(w, codes, fp8, qmax, sign_from_x)
    if scaling == "row":
        scale = torch.empty(rows, 1, dtype=torch.float32, device=w.device)
        _quantize_rows_kernel[(rows,)](
            w, codes, scale, cols, w.stride(0), codes.stride(0),
            BLOCK_C=block_c or _row_block(cols), FP8=fp8, QMAX=qmax, SIGN_FROM_X=sign_from_x,
            num_warps=num_warps or (8 if cols >= 8192 else 4),
        )  # fmt: skip
        return codes, scale
    b = int(fmt.block_size)  # type: ignore[attr-defined]
    grid = (math.ceil(rows / b), math.ceil(cols / b))
    scale = torch.empty(grid, dtype=torch.float32, device=w.device)
    _quantize_groups_kernel[grid](
        w, codes, scale, rows, cols, w.stride(0), codes.stride(0), scale.stride(0), 1,
        TILE_R=b, TILE_C=b, PER_ROW=False, FP8=fp8, QMAX=qmax, SIGN_FROM_X=sign_from_x,
        num_warps=num_warps or max(1, min(16, b * b // (1024 if fp8 else 2048))),
    )  # fmt: skip
    return codes, scale


def _quantize_tensor(
    w: torch.Tensor, codes: torch.Tensor, fp8: bool, qmax: float, sign_from_x: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if not w.is_contiguous():
        w = w.contiguous()
    n = w.numel()
    block = 8192
    n_prog = max(1, triton.cdiv(n, block))
    amax_bits = torch.zeros(1, dtype=torch.int32, device=w.device)
    scale = torch.empty((), dtype=torch.float32, device=w.device)
    _absmax_atomic_kernel[(n_prog,)](w, amax_bits, n, BLOCK=block, num_warps=8)
    _quantize_tensor_kernel[(n_prog,)](
        w, codes, amax_bits, scale, n,
        BLOCK=block, FP8=fp8, QMAX=qmax, SIGN_FROM_X=sign_from_x, num_warps=8,
    )  # fmt: skip
    return codes, scale


def quantize_activations(
    x: torch.Tensor,
    *,
    fp8: bool,
    block_size: int,
    tile_r: int | None = None,
    num_warps: int | None = None,
    sign_from_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``1 x B`` groups along K: ``[M, K]`` -> codes ``[M, K]``, scale ``[M, ceil(K/B)]`` F32.

    The scale is stored K-block-major (``scale.t()`` is contiguous ``[ceil(K/B), M]``): the
    GEMM reads one contiguous run of M scales per K-block, and cuBLAS wants this layout too.
    """
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    kb = math.ceil(k / block_size)
    codes = torch.empty(m, k, dtype=_code_dtype(fp8), device=x.device)
    scale_t = torch.empty(kb, m, dtype=torch.float32, device=x.device)
    tile_r = tile_r or max(1, min(32, 4096 // block_size))
    _quantize_groups_kernel[(triton.cdiv(m, tile_r), kb)](
        x, codes, scale_t, m, k, x.stride(0), codes.stride(0), 1, scale_t.stride(0),
        TILE_R=tile_r, TILE_C=block_size, PER_ROW=True, FP8=fp8,
        QMAX=_FP8_MAX if fp8 else _INT8_MAX, SIGN_FROM_X=sign_from_x, num_warps=num_warps or 4,
    )  # fmt: skip
    return codes, scale_t.t()
