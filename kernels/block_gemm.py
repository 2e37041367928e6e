"""Block-scaled linear: ``y = x @ dequant(W).T + bias`` with 8-bit tensor-core products.

Math (DeepSeek-V3 / JetFire style; the spec is ``quant_core.matmul``): x ``[M, K]`` is quantized
per ``1 x B`` group along K (``quantize_activations``), W ``[N, K]`` holds ``B x B`` blocks with
scales ``[ceil(N/B), ceil(K/B)]``. For each K-block ``kb`` the 8-bit product of one ``B``-wide
slice is accumulated exactly (int32 for INT8, fp32 for FP8) and added to an fp32 accumulator
times ``a_scale[m, kb] * w_scale[n // B, kb]``.

Cost for M=4096, K=N=3072: 77 GOP of 8-bit MMA (about 40 us at ~1980 dense TOP/s), plus one
fp32 rescale per output element per K-block on the CUDA cores (K/B = 24 multiply-adds per
output). The rescale needs each K-block's int32 product before the next MMA can accumulate, so
the MMAs cannot chain, and Triton waits for every such MMA right after issuing it (no overlap
inside a program; only the 3 programs per SM overlap each other): on an H200 this kernel
reaches 1.16-1.22x bf16 (persistent grid) where the same Triton loop without scales reaches
1.4-1.8x (bench/KERNELS_NOTES.md). Memory: x read once in bf16 by the activation quantizer
(3 bytes/element), 8-bit operands re-read from L2 per tile.

FP8 note: Hopper's FP8 tensor cores sum a K-block with fewer bits than fp32 (measured rel.
error 1.3e-4 of the fp32-output result, vs 1e-7 for INT8); cuBLAS's path has the same figure.

The tile is ``BM x BN`` with ``BK = B`` and ``BN`` dividing ``B``, so one weight scale covers the
whole tile for a K-block: the rescale is ``acc += part * (a_scale * w_scale)[:, None]``.
Operands are loaded through TMA descriptors where strides allow it (``USE_TMA``), else with
masked pointer loads; both paths are the same source, so the interpreter tests both.

``fp8_scaled_mm`` uses cuBLAS's own 1x128 x 128x128 block-scaled FP8 GEMM through
``torch._scaled_mm`` when the installed torch supports it (probed by the dispatcher).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_OUT_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of the Triton GEMM."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8
    use_tma: bool = True
    magic_cvt: bool = False
    pipeline: bool = False
    warp_specialize: bool = False
    no_scale: bool = False  # benchmark ceiling only: ignores the scales
    persistent: int = 0  # programs per SM of a persistent grid (0: one program per tile)
    maxnreg: int | None = None  # register cap per thread (more programs per SM, may spill)


@triton.jit
def _int32_to_float(part, MAGIC_CVT: tl.constexpr):
    """int32 -> float32. ``MAGIC_CVT``: |part| < 2**22 (always true for one K-block of int8
    products: 128·127·127 < 2**21), so ``bits(part + 0x4B400000) - 1.5·2**23`` is exact and
    avoids the conversion unit (an integer add and a float add instead)."""
    if MAGIC_CVT:
        return (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return part.to(tl.float32)


@triton.jit
def _load_tiles(
    a_src, w_src, kb, off_m, off_n, M, N, K, stride_a, stride_w,
    B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IS_FP8: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """Codes ``A[off_m:+BM, kb]`` and ``W[off_n:+BN, kb]``, zero outside the matrices."""
    if USE_TMA:
        # TMA fills out-of-bounds rows/columns with zeros.
        a = a_src.load([off_m, kb * B])
        w = w_src.load([off_n, kb * B])
    else:
        offs_m = off_m + tl.arange(0, BM)
        offs_n = off_n + tl.arange(0, BN)
        offs_k = tl.arange(0, B)
        k_ok = (kb * B + offs_k) < K
        a_ptrs = a_src + offs_m[:, None].to(tl.int64) * stride_a + (kb * B + offs_k)[None, :]
        w_ptrs = w_src + offs_n[:, None].to(tl.int64) * stride_w + (kb * B + offs_k)[None, :]
        # Codes arrive as int8 (FP8 viewed as int8) so that padding can be a zero byte.
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & k_ok[None, :], other=0)
        if IS_FP8:
            a = a.to(tl.float8e4nv, bitcast=True)
            w = w.to(tl.float8e4nv, bitcast=True)
    return a, w


@triton.jit
def _block_product(a, w, IS_FP8: tl.constexpr, MAGIC_CVT: tl.constexpr):
    """``P = a @ w.T`` for one K-block, as float32 ``[BM, BN]`` (exact for INT8)."""
    if IS_FP8:
        return tl.dot(a, tl.trans(w))
    else:
        return _int32_to_float(tl.dot(a, tl.trans(w), out_dtype=tl.int32), MAGIC_CVT)


@triton.jit
def _output_tile(
    a_src, a_scale_ptr, w_src, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
    stride_a, stride_w, stride_o, stride_ws, tile,
    B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
    IS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr,
    MAGIC_CVT: tl.constexpr, PIPELINE: tl.constexpr, WARP_SPEC: tl.constexpr,
    NO_SCALE: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    """Output tile number ``tile`` (grouped order) of ``[M, N]``: the K loop and the store."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped order: GROUP_M row-tiles share each weight column-tile while it sits in L2.
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_n)) % size_m
    pid_n = (tile % (GROUP_M * num_n)) // size_m
    off_m = pid_m * BM
    off_n = pid_n * BN

    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    m_ok = offs_m < M
    w_scale_row = w_scale_ptr + (off_n // B) * stride_ws
    num_kb = tl.cdiv(K, B)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if NO_SCALE:
        acc_i = tl.zeros([BM, BN], dtype=tl.int32)
        for kb in range(0, num_kb):
            a, w = _load_tiles(
                a_src, w_src, kb, off_m, off_n, M, N, K, stride_a, stride_w,
                B, BM, BN, IS_FP8, USE_TMA,
            )  # fmt: skip
            acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
        acc = acc_i.to(tl.float32)
    elif PIPELINE:
        a, w = _load_tiles(
            a_src, w_src, 0, off_m, off_n, M, N, K, stride_a, stride_w,
            B, BM, BN, IS_FP8, USE_TMA,
        )  # fmt: skip
        part = _block_product(a, w, IS_FP8, MAGIC_CVT)
        for kb in range(1, num_kb):
            a, w = _load_tiles(
                a_src, w_src, kb, off_m, off_n, M, N, K, stride_a, stride_w,
                B, BM, BN, IS_FP8, USE_TMA,
            )  # fmt: skip
            nxt = _block_product(a, w, IS_FP8, MAGIC_CVT)
            a_scale = tl.load(a_scale_ptr + (kb - 1) * M + offs_m, mask=m_ok, other=0.0)
            acc += part * (a_scale * tl.load(w_scale_row + kb - 1))[:, None]
            part = nxt
        a_scale = tl.load(a_scale_ptr + (num_kb - 1) * M + offs_m, mask=m_ok, other=0.0)
        acc += part * (a_scale * tl.load(w_scale_row + num_kb - 1))[:, None]
    else:
        for kb in tl.range(0, num_kb, warp_specialize=WARP_SPEC):
            a, w = _load_tiles(
                a_src, w_src, kb, off_m, off_n, M, N, K, stride_a, stride_w,
                B, BM, BN, IS_FP8, USE_TMA,
            )  # fmt: skip
            part = _block_product(a, w, IS_FP8, MAGIC_CVT)
            a_scale = tl.load(a_scale_ptr + kb * M + offs_m, mask=m_ok, other=0.0)
            acc += part * (a_scale * tl.load(w_scale_row + kb))[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if OUT == 1:
        out = acc.to(tl.bfloat16)
    elif OUT == 2:
        out = acc.to(tl.float16)
    else:
        out = acc
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :]
    tl.store(o_ptrs, out, mask=m_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _block_scaled_mm_kernel(
    a_src,
    a_scale_ptr,
    w_src,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_a,
    stride_w,
    stride_o,
    stride_ws,
    B: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GROUP_M: tl.constexpr,
    IS_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr,
    MAGIC_CVT: tl.constexpr,
    PIPELINE: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    NO_SCALE: tl.constexpr,
    OUT: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """``a_src``/``w_src``: TMA descriptors (``USE_TMA``) or pointers to codes ``[M, K]``,
    ``[N, K]``; ``a_scale_ptr``: ``[ceil(K/B), M]`` contiguous; ``w_scale_ptr``: ``[., ceil(K/B)]``
    with row stride ``stride_ws``. ``PIPELINE``: issue the next K-block's MMA before rescaling
    the previous one. ``WARP_SPEC``: Triton's warp specialization of the K loop.
    ``NO_SCALE``: benchmark-only ceiling, a plain INT8 GEMM that ignores every scale.
    ``PERSISTENT``: a fixed grid; each program walks the tiles ``pid, pid + grid, ...``."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _output_tile(
                a_src, a_scale_ptr, w_src, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                stride_a, stride_w, stride_o, stride_ws, tile,
                B, BM, BN, GROUP_M, IS_FP8, HAS_BIAS, USE_TMA, MAGIC_CVT, PIPELINE, WARP_SPEC,
                NO_SCALE, OUT,
            )  # fmt: skip
    else:
        _output_tile(
            a_src, a_scale_ptr, w_src, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
            stride_a, stride_w, stride_o, stride_ws, tl.program_id(0),
            B, BM, BN, GROUP_M, IS_FP8, HAS_BIAS, USE_TMA, MAGIC_CVT, PIPELINE, WARP_SPEC,
            NO_SCALE, OUT,
        )  # fmt: skip


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's CPU interpreter: few programs, so each walks several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and row stride (1-byte codes: K % 16 == 0)."""
    return t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0


def default_config(block_size: int, *, fp8: bool) -> GemmConfig:
    """The tile used when the caller names none, from the H200 sweeps in bench/KERNELS_NOTES.md:
    64 x 128 tiles with one warpgroup and 3 stages leave room for 3 programs per SM, whose MMAs
    overlap each other's per-K-block rescaling (128 x 128 tiles: one program per SM, 30-40 %
    slower). INT8 runs on a persistent grid of 3 programs per SM (+3-10 % on an H200); FP8's
    Triton path (few rows; cuBLAS takes the rest) was not swept with it and keeps one program
    per tile."""
    bn = min(128, block_size)
    return GemmConfig(
        block_m=64,
        block_n=bn,
        num_warps=4,
        num_stages=3,
        group_m=8 if fp8 else 16,
        persistent=0 if fp8 else 3,
    )


def block_scaled_mm(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    block_size: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Quantized operands -> ``[M, N]`` in ``out_dtype``.

    ``a_codes`` ``[M, K]`` and ``a_scale`` ``[M, ceil(K/B)]`` (K-block-major storage, as
    ``quantize_activations`` returns it); ``w_codes`` ``[N, K]``, ``w_scale``
    ``[ceil(N/B), ceil(K/B)]``; both codes int8, or both float8_e4m3fn.
    """
    m, k = a_codes.shape
    n = w_codes.shape[0]
    is_fp8 = a_codes.dtype == torch.float8_e4m3fn
    cfg = config or default_config(block_size, fp8=is_fp8)
    if block_size % cfg.block_n:
        raise ValueError(f"block_n={cfg.block_n} must divide the block size {block_size}")
    a_scale_t = a_scale.t()
    if not a_scale_t.is_contiguous():
        a_scale_t = a_scale_t.contiguous()
    w_scale = w_scale.float()
    if w_scale.stride(1) != 1:
        w_scale = w_scale.contiguous()
    if a_codes.stride(1) != 1:
        a_codes = a_codes.contiguous()
    if w_codes.stride(1) != 1:
        w_codes = w_codes.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a_codes.device)
    use_tma = cfg.use_tma and _tma_ok(a_codes) and _tma_ok(w_codes)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_src = TensorDescriptor.from_tensor(a_codes, [cfg.block_m, block_size])
        w_src = TensorDescriptor.from_tensor(w_codes, [cfg.block_n, block_size])
    else:
        a_src, w_src = a_codes.view(torch.int8), w_codes.view(torch.int8)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    grid = (min(tiles, cfg.persistent * _sm_count(out.device)) if cfg.persistent else tiles,)
    _block_scaled_mm_kernel[grid](
        a_src, a_scale_t, w_src, w_scale, bias if bias is not None else out, out,
        m, n, k, a_codes.stride(0), w_codes.stride(0), out.stride(0), w_scale.stride(0),
        B=block_size, BM=cfg.block_m, BN=cfg.block_n, GROUP_M=cfg.group_m,
        IS_FP8=is_fp8, HAS_BIAS=bias is not None,
        USE_TMA=use_tma, MAGIC_CVT=cfg.magic_cvt, PIPELINE=cfg.pipeline,
        WARP_SPEC=cfg.warp_specialize, NO_SCALE=cfg.no_scale, OUT=_OUT_IDS[out_dtype],
        PERSISTENT=bool(cfg.persistent),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )  # fmt: skip
    return out


def fp8_scaled_mm(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    bias_epilogue: bool = False,
) -> torch.Tensor:
    """cuBLAS block-scaled FP8 GEMM (B = 128, K and N multiples of 128) via ``torch._scaled_mm``.

    Layouts cuBLAS asks for: ``a_scale`` ``[M, K/128]`` K-block-major (stride ``(1, M)``, as
    ``quantize_activations`` stores it), ``w_scale`` as ``[K/128, N/128]`` K-major, with
    K/128 padded to a multiple of 4. ``bias_epilogue``: cuBLAS adds a bias of the output dtype
    (bf16/fp16) before its one output rounding (the caller probes support); else a separate add.
    """
    kb = w_scale.shape[1]
    pad = -kb % 4
    ws = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
    if pad:
        ws = torch.nn.functional.pad(ws, (0, pad))
    ws = ws.contiguous().t()
    if a_scale.stride(0) != 1:
        a_scale = a_scale.t().contiguous().t()
    out_dt = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.float32
    # Only a bias already in the output dtype: converting one would round it twice.
    fused = bias is not None and bias_epilogue and bias.dtype == out_dt != torch.float32
    out = torch._scaled_mm(
        a_codes, w_codes.t(), a_scale, ws, bias=bias if fused else None, out_dtype=out_dt
    )
    if bias is not None and not fused:
        out = out + bias.to(out.dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)
