"""Fused quantize kernels: absmax -> scale -> round-half-even -> saturate -> codes, in one pass.

Launchers mirror ``quant_core.formats.quantize`` (same signature, bit-identical codes and scales):

- per-row (FP8, INT8): rows of up to 16384 elements are held whole in registers, one program
  per row (or several short rows): one DRAM read, one write. Longer rows: two sweeps per row,
  the second one reading the row back from L2.
- per-block ``B x B`` (FP8, INT8): one program per block held in registers.
- per ``1 x B`` along K (activations, ``quantize_activations``): one program per tile of rows x
  several groups, codes = x times the reciprocal of the scale (``matmul.quantize_activations``).
- per-tensor (FP8, INT8): an absmax pass, then a quantize pass (the amax of the whole tensor
  must be known before the first code). The quantize pass walks the tensor backwards, so its
  first reads hit what the absmax pass left in L2.

Memory traffic, bf16 weight ``[R, C]``: 2·R·C bytes read + R·C written (+ scales), i.e. 3 bytes
per element, the floor for an I/O-bound conversion; per-tensor reads the input twice.

Exactness (weights): the reference's math, in float32: ``scale = amax / qmax`` with IEEE division
(``div_rn``), ``w / scale`` correctly rounded (reciprocal + two exact FMA corrections, cheaper
than a division per element), round-half-to-even. FP8 codes: on CUDA the hardware's
round-to-nearest-even, saturating conversion; in Triton's interpreter (which does not round FP8
casts to nearest-even) the values are first put on the E4M3 grid with integer arithmetic, so
every cast is exact. Both give the reference's bits. NaN/Inf propagate into the scale, so the
caller sees a non-finite scale and raises like the reference.

Cost: 3 bytes per element at ~3.8 TB/s leaves ~30 instructions per element on an H200, and the
exact quotient takes 6 of the ~20 these kernels issue per element. Measured on an H200
(bench/KERNELS_NOTES.md, run 6): 72-78 % of a device-to-device copy for row and block scales,
FP8 as fast as INT8; per-tensor 54-56 % counting one read of the input, 89-93 % counting the
two it makes; dequantize 88-91 %. The activation quantizer, whose spec multiplies by the
reciprocal instead, reaches 85-94 %.

Nothing is compiled at import; each kernel compiles on first launch for its constexprs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
def _encode(x, k, s, inv, FP8: tl.constexpr, HW_FP8: tl.constexpr):
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
    # The corrections turn a -0.0 input into q = +0.0: the sign is taken from x.
    if FP8 and HW_FP8:
        q_bits = q.to(tl.int32, bitcast=True) | (x.to(tl.int32, bitcast=True) & -2147483648)
        return _to_code(q_bits.to(tl.float32, bitcast=True), x, FP8, True)
    return _to_code(q, x, FP8, False)


@triton.jit
def _to_code(q, sign_src, FP8: tl.constexpr, HW_FP8: tl.constexpr):
    """float32 ``q`` (``|q| <= qmax * (1 + 2**-22)``) -> int8 or e4m3 code, round-half-to-even,
    with the sign of ``sign_src`` (which has the sign the exact quotient has).

    ``HW_FP8`` (GPU only): the hardware's float32 -> e4m3 conversion (``cvt.rn.satfinite``,
    round-half-even, saturating; it keeps ``q``'s own sign) instead of rounding on the grid with
    integer arithmetic; the interpreter's cast does not round to nearest-even, so the CPU tests
    use the grid path.
    """
    if FP8 and HW_FP8:
        return q.to(tl.float8e4nv)
    elif FP8:
        # Round onto the E4M3 grid in float32: the spacing around |q| = 1.m * 2**e is
        # 2**(e-3) (at least 2**-9, subnormals); as biased exponents step = max(E - 3, 118).
        # |q| / step < 2**5 is exact and so is the 1.5*2**23 rounding trick on it.
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        mag_bits = q.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        step_e = tl.maximum((mag_bits >> 23) - 3, 118)
        step = (step_e << 23).to(tl.float32, bitcast=True)
        inv_step = ((254 - step_e) << 23).to(tl.float32, bitcast=True)
        mag = mag_bits.to(tl.float32, bitcast=True)
        r = ((mag * inv_step + 12582912.0) - 12582912.0) * step
        sign = sign_src.to(tl.int32, bitcast=True) & -2147483648
        r_bits = r.to(tl.int32, bitcast=True) | sign
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
    QMAX: tl.constexpr, HW_FP8: tl.constexpr,
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
    tl.store(codes_ptr + offs, _encode(x, k, s, inv, FP8, HW_FP8), mask=mask)


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
    HW_FP8: tl.constexpr,
):
    """Rows too long for registers: one row per program, an absmax sweep, the scale, then a
    quantize sweep (the row re-read from L2)."""
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
        codes = _encode(x, k, s, inv, FP8, HW_FP8)
        tl.store(c_row + start + cols, codes, mask=mask)


@triton.jit
def _quantize_tile_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    n_groups,
    stride_x,
    stride_c,
    stride_s,
    TILE_R: tl.constexpr,
    GROUPS: tl.constexpr,
    TILE_C: tl.constexpr,
    PER_ROW: tl.constexpr,
    EVEN: tl.constexpr,
    FP8: tl.constexpr,
    QMAX: tl.constexpr,
    HW_FP8: tl.constexpr,
):
    """One program: ``TILE_R`` rows x ``GROUPS`` consecutive column groups of ``TILE_C``,
    addressed as ``[rows, GROUPS, TILE_C]`` (no reshape: each row is one contiguous run).

    ``PER_ROW``: one scale per row (the grid's column dimension is 1 and the groups cover the
    row), stored at ``scale[row]``. Else one scale per ``TILE_R x TILE_C`` block, stored at
    ``scale[program_id(0) * stride_s + group]``. ``EVEN``: every tile is full, no masks. (Reading a
    block twice in row slices, in fewer registers, measured 15-35 % slower on an H200.)
    """
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[None, :, None] * TILE_C + tl.arange(0, TILE_C)[None, None, :]
    rows = tl.program_id(0).to(tl.int64) * TILE_R + tl.arange(0, TILE_R)
    offs = rows[:, None, None] * stride_x + cols
    c_offs = rows[:, None, None] * stride_c + cols
    if EVEN:
        x = tl.load(x_ptr + offs).to(tl.float32)
    else:
        mask = (rows[:, None, None] < n_rows) & (cols < n_cols)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bits = _abs_bits(x)
    if PER_ROW:
        scale = _scale_from_amax(tl.max(tl.max(bits, 2), 1).to(tl.float32, bitcast=True), QMAX)
        tl.store(scale_ptr + rows, scale, mask=rows < n_rows)
        k, s, inv = _division_setup(scale[:, None, None])
    else:
        amax = tl.max(tl.max(bits, 2), 0).to(tl.float32, bitcast=True)
        scale = _scale_from_amax(amax, QMAX)
        tl.store(scale_ptr + tl.program_id(0) * stride_s + groups, scale, mask=groups < n_groups)
        k, s, inv = _division_setup(scale[None, :, None])
    codes = _encode(x, k, s, inv, FP8, HW_FP8)
    if EVEN:
        tl.store(codes_ptr + c_offs, codes)
    else:
        tl.store(codes_ptr + c_offs, codes, mask=mask)


def _is_fp8(fmt: object) -> bool:
    return str(getattr(fmt.kind, "value", fmt.kind)) == "fp8"  # type: ignore[attr-defined]


def _scaling(fmt: object) -> str:
    return str(getattr(fmt.scaling, "value", fmt.scaling))  # type: ignore[attr-defined]


def _code_dtype(fp8: bool) -> torch.dtype:
    return torch.float8_e4m3fn if fp8 else torch.int8


@dataclass(frozen=True)
class WeightConfig:
    """Launch shape of the weight quantizers; ``None`` fields take the defaults below.

    ``num_warps``; ``groups``: blocks per program along a row (block scaling); ``row_tile``:
    rows per program, each held whole in registers (row scaling; 0 = the two-sweep kernel);
    ``chunk``: elements per loop step (row sweeps) or per program (per-tensor); ``hw_fp8``:
    the hardware FP8 conversion (None = on CUDA only).
    """

    num_warps: int | None = None
    groups: int = 1
    row_tile: int | None = None
    chunk: int | None = None
    hw_fp8: bool | None = None


_MAX_ROW_IN_REGISTERS = 16384  # elements of a row one program holds (64 per thread at 8 warps)


def _row_chunk(cols: int) -> int:
    """Chunk of a row per loop step: the largest power of two in [512, 4096] dividing ``cols``
    (no masked lanes), else 2048."""
    for block in (4096, 2048, 1024, 512):
        if cols % block == 0:
            return block
    return min(2048, triton.next_power_of_2(max(cols, 16)))


def quantize(
    w: torch.Tensor, fmt: object, *, config: WeightConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``[out, in]`` -> codes ``[out, in]``, scale F32 in ``fmt.scale_shape``.

    Same contract as ``formats.quantize`` except that a NaN/Inf input gives a non-finite scale
    instead of raising (the dispatcher checks and raises). ``w``: bf16/fp16/fp32, 2-D.
    ``config`` overrides the launch shape (benchmarks and tests).
    """
    cfg = config or WeightConfig()
    fp8 = _is_fp8(fmt)
    qmax = _FP8_MAX if fp8 else _INT8_MAX
    hw_fp8 = fp8 and (w.device.type == "cuda" if cfg.hw_fp8 is None else cfg.hw_fp8)
    rows, cols = w.shape
    if w.stride(1) != 1:
        w = w.contiguous()
    codes = torch.empty(rows, cols, dtype=_code_dtype(fp8), device=w.device)
    common = {"FP8": fp8, "QMAX": qmax, "HW_FP8": hw_fp8}
    scaling = _scaling(fmt)
    if scaling == "tensor":
        return _quantize_tensor(w, codes, cfg, common)
    if scaling == "row":
        scale = torch.empty(rows, 1, dtype=torch.float32, device=w.device)
        width = triton.next_power_of_2(max(cols, 16))
        row_tile = cfg.row_tile
        if row_tile is None:
            row_tile = max(1, 4096 // width) if width <= _MAX_ROW_IN_REGISTERS else 0
        if row_tile:
            warps = cfg.num_warps or max(4, min(8, row_tile * width // 2048))
            _quantize_tile_kernel[(triton.cdiv(rows, row_tile), 1)](
                w, codes, scale, rows, cols, 1, w.stride(0), codes.stride(0), 0,
                TILE_R=row_tile, GROUPS=1, TILE_C=width, PER_ROW=True,
                EVEN=rows % row_tile == 0 and cols == width, num_warps=warps, **common,
            )  # fmt: skip
        else:
            _quantize_rows_kernel[(rows,)](
                w, codes, scale, cols, w.stride(0), codes.stride(0),
                BLOCK_C=cfg.chunk or _row_chunk(cols),
                num_warps=cfg.num_warps or (8 if cols >= 8192 else 4), **common,
            )  # fmt: skip
        return codes, scale
    b = int(fmt.block_size)  # type: ignore[attr-defined]
    n_groups = math.ceil(cols / b)
    groups = max(1, min(cfg.groups, triton.next_power_of_2(n_groups)))
    grid = (math.ceil(rows / b), triton.cdiv(n_groups, groups))
    scale = torch.empty(grid[0], n_groups, dtype=torch.float32, device=w.device)
    _quantize_tile_kernel[grid](
        w, codes, scale, rows, cols, n_groups, w.stride(0), codes.stride(0), scale.stride(0),
        TILE_R=b, GROUPS=groups, TILE_C=b, PER_ROW=False,
        EVEN=rows % b == 0 and cols % (groups * b) == 0,
        num_warps=cfg.num_warps or max(1, min(16, groups * b * b // 1024)),
        **common,
    )  # fmt: skip
    return codes, scale


def _quantize_tensor(
    w: torch.Tensor, codes: torch.Tensor, cfg: WeightConfig, common: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    if not w.is_contiguous():
        w = w.contiguous()
    n = w.numel()
    block = cfg.chunk or 8192
    n_prog = max(1, triton.cdiv(n, block))
    amax_bits = torch.zeros(1, dtype=torch.int32, device=w.device)
    scale = torch.empty((), dtype=torch.float32, device=w.device)
    warps = cfg.num_warps or 8
    _absmax_atomic_kernel[(n_prog,)](w, amax_bits, n, BLOCK=block, num_warps=warps)
    _quantize_tensor_kernel[(n_prog,)](
        w, codes, amax_bits, scale, n, BLOCK=block, num_warps=warps, **common
    )
    return codes, scale


@triton.jit
def _quantize_act_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    n_groups,
    stride_x,
    stride_c,
    stride_s,
    TILE_R: tl.constexpr,
    GROUPS: tl.constexpr,
    B: tl.constexpr,
    FP8: tl.constexpr,
    QMAX: tl.constexpr,
    HW_FP8: tl.constexpr,
):
    """``1 x B`` groups: one program quantizes ``TILE_R`` rows x ``GROUPS`` consecutive groups.

    The tile is addressed as ``[TILE_R, GROUPS, B]`` (no reshape, so no layout shuffle): each
    row contributes one contiguous run of ``GROUPS * B`` elements (longer DRAM bursts than one
    group), the absmax reduces over the last axis. Scales go to ``scale[g, row]`` (K-block-major,
    ``stride_s`` between groups): a program's stores of one group are contiguous.
    """
    rows = tl.program_id(0).to(tl.int64) * TILE_R + tl.arange(0, TILE_R)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    lanes = tl.arange(0, B)
    cols = groups[None, :, None] * B + lanes[None, None, :]
    row_ok = rows[:, None, None] < n_rows
    mask = row_ok & (cols < n_cols)
    x = tl.load(x_ptr + rows[:, None, None] * stride_x + cols, mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = _scale_from_amax(_absmax(x, 2), QMAX)  # [TILE_R, GROUPS]
    s_ptrs = scale_ptr + groups[None, :].to(tl.int64) * stride_s + rows[:, None]
    tl.store(s_ptrs, scale, mask=(rows[:, None] < n_rows) & (groups[None, :] < n_groups))
    # The spec (matmul.quantize_activations): x times the IEEE reciprocal of the scale.
    # scale >= the smallest normal, so 1 / scale is finite; |q| <= qmax (1 + 2**-22).
    inv = tl.math.div_rn(1.0, scale)
    q = x * inv[:, :, None]
    codes = _to_code(q, q, FP8, HW_FP8)
    tl.store(codes_ptr + rows[:, None, None] * stride_c + cols, codes, mask=mask)


@dataclass(frozen=True)
class ActConfig:
    """Launch shape of the activation quantizer: ``tile_r`` rows x ``groups`` groups of ``B``
    per program. ``hw_fp8``: the hardware FP8 conversion (GPU; None = on CUDA only)."""

    tile_r: int = 16
    groups: int = 2
    num_warps: int = 4
    hw_fp8: bool | None = None


def default_act_config(k: int, block_size: int) -> ActConfig:
    """The launch shape used when the caller names none (see bench/KERNELS_NOTES.md)."""
    groups = max(1, min(2, triton.cdiv(k, block_size)))
    return ActConfig(tile_r=max(1, min(16, 4096 // (groups * block_size))), groups=groups)


def quantize_activations(
    x: torch.Tensor,
    *,
    fp8: bool,
    block_size: int,
    config: ActConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``1 x B`` groups along K: ``[M, K]`` -> codes ``[M, K]``, scale ``[M, ceil(K/B)]`` F32.

    The scale is stored K-block-major (``scale.t()`` is contiguous ``[ceil(K/B), M]``): the
    GEMM reads one contiguous run of M scales per K-block, and cuBLAS wants this layout too.
    Memory: one read of x, one write of the codes (1 byte) and scales: 3 bytes per bf16 element.
    """
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_act_config(k, block_size)
    kb = math.ceil(k / block_size)
    codes = torch.empty(m, k, dtype=_code_dtype(fp8), device=x.device)
    scale_t = torch.empty(kb, m, dtype=torch.float32, device=x.device)
    hw_fp8 = x.device.type == "cuda" if cfg.hw_fp8 is None else cfg.hw_fp8
    grid = (triton.cdiv(m, cfg.tile_r), triton.cdiv(kb, cfg.groups))
    _quantize_act_kernel[grid](
        x, codes, scale_t, m, k, kb, x.stride(0), codes.stride(0), scale_t.stride(0),
        TILE_R=cfg.tile_r, GROUPS=cfg.groups, B=block_size, FP8=fp8,
        QMAX=_FP8_MAX if fp8 else _INT8_MAX, HW_FP8=fp8 and hw_fp8, num_warps=cfg.num_warps,
        enable_fp_fusion=False,  # x * inv + 1.5*2**23 must round twice, as the spec does
    )  # fmt: skip
    return codes, scale_t.t()
