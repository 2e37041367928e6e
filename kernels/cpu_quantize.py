"""CPU kernels: the absmax of each scale group, then scale, round, encode and measure, each in
one pass over a chunk of rows of the stored weight (numba).

The PyTorch reference (``formats._quantize_rows``) takes about ten whole-chunk operations per
chunk, on a float32 copy; on a memory-starved machine each costs a pass over the data, and with
small chunks the per-operation overhead (which holds the GIL) dominates. These kernels read the
stored bfloat16 or float32 weight directly (bfloat16 is widened one row segment at a time, in
L1) and do the arithmetic element by element: ``y = clamp(x / s)``, round half to even on the
target grid, store the code, and accumulate ``Σx²`` and ``Σ(x − q·s)²`` for the weight SQNR.
Codes are bit-identical to the reference: the division is IEEE (numba's fastmath is limited to
re-associating the two sums, which only reorders float32 additions of the measurements), the
INT8 rounding is ``rint`` and the E4M3 rounding is done on the float32 bit pattern.

Memory traffic per element: read the stored weight twice (absmax, then quantize; the chunk is
still in cache the second time), write 1 byte. Imported lazily by ``quant_core.dispatch``; needs
numba (optional: without it the PyTorch reference runs).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

# fastmath limited to reassociation (and signed zeros): the float32 sums may be vectorised,
# while every division, comparison and rounding stays IEEE-exact.
_FLAGS = {"reassoc", "nsz"}
_JIT = {"cache": True, "nogil": True, "fastmath": _FLAGS, "boundscheck": False}

# Each row is walked in segments that share one scale (the whole row for tensor/row scales, B
# columns for blocks), each a 1-D slice indexed from 0: with a scalar scale and indices numba
# knows are non-negative (no wrap-around check), LLVM vectorises the loops (~3-4x faster).


def _widen(src, buf):  # pragma: no cover - typed below
    """A row segment as float32: bfloat16 bit patterns (uint16) are widened through ``buf``
    (uint32 scratch); float32 passes through. Resolved per dtype when numba compiles."""


@overload(_widen, jit_options={"fastmath": _FLAGS})
def _widen_impl(src, buf):  # type: ignore[no-untyped-def]
    if src.dtype == types.uint16:

        def bf16(src, buf):  # pragma: no cover - compiled
            out = buf[: src.shape[0]]
            for i in range(src.shape[0]):
                out[i] = np.uint32(src[i]) << np.uint32(16)
            return out.view(np.float32)

        return bf16
    if src.dtype == types.float32:
        return lambda src, buf: src
    return None


@njit(**_JIT)
def _absmax_kernel(bits, br, bc, out, mask):  # pragma: no cover - compiled
    # On bit patterns: with the sign masked off, unsigned order is |x| order for every finite
    # value, and NaN / Inf patterns lie above all of them, so the maximum stays exact, flags
    # non-finite groups by itself, and vectorises as a plain integer max.
    rows, cols = bits.shape
    out[:, :] = 0
    for r in range(rows):
        orow = out[r // br]
        for j in range(orow.shape[0]):
            seg = bits[r, j * bc : min(cols, (j + 1) * bc)]
            m = mask ^ mask  # zero, in the bits' type
            for i in range(seg.shape[0]):
                m = max(m, seg[i] & mask)
            orow[j] = max(orow[j], m)


@njit(**_JIT)
def _int8_kernel(x, scale, br, bc, codes, buf, sums):  # pragma: no cover - compiled
    rows, cols = x.shape
    total_s = 0.0
    total_e = 0.0
    for r in range(rows):
        srow = scale[r // br]
        for j in range(srow.shape[0]):
            s = srow[j]
            end = min(cols, (j + 1) * bc)
            xs = _widen(x[r, j * bc : end], buf)
            cs = codes[r, j * bc : end]
            acc_s = np.float32(0.0)
            acc_e = np.float32(0.0)
            for i in range(xs.shape[0]):
                f = xs[i]
                q = np.rint(min(max(f / s, np.float32(-127.0)), np.float32(127.0)))
                cs[i] = np.int8(q)
                d = q * s - f
                acc_s += f * f
                acc_e += d * d
            total_s += acc_s
            total_e += acc_e
    sums[0] += total_s
    sums[1] += total_e


@njit(**_JIT)
def _fp8_kernel(x, scale, br, bc, codes, buf, y, rnd, sums):  # pragma: no cover - compiled
    # codes: uint8 view of float8_e4m3fn. y / rnd: float32 / uint32 row buffers whose other
    # views give bit patterns (numba cannot reinterpret a scalar). Branch-free loops vectorise.
    rows, cols = x.shape
    total_s = 0.0
    total_e = 0.0
    for r in range(rows):
        srow = scale[r // br]
        for j in range(srow.shape[0]):
            s = srow[j]
            end = min(cols, (j + 1) * bc)
            xs = _widen(x[r, j * bc : end], buf)
            cs = codes[r, j * bc : end]
            n = xs.shape[0]
            ys = y[:n]
            yb = ys.view(np.uint32)
            rn = rnd[:n]
            rf = rn.view(np.float32)
            for i in range(n):
                ys[i] = min(max(xs[i] / s, np.float32(-448.0)), np.float32(448.0))
            for i in range(n):
                # normal range: keep 3 mantissa bits of |y|, half to even (carry to exponent)
                mag = yb[i] & np.uint32(0x7FFFFFFF)
                lsb = (mag >> np.uint32(20)) & np.uint32(1)
                rn[i] = (mag + np.uint32(0x7FFFF) + lsb) & np.uint32(0xFFF00000)
            acc_s = np.float32(0.0)
            acc_e = np.float32(0.0)
            for i in range(n):
                a = abs(ys[i])
                m = np.rint(a * np.float32(512.0))  # subnormal range: step 2**-9, exact
                sub = a < np.float32(0.015625)  # below 2**-6
                g = m * np.float32(0.001953125) if sub else rf[i]
                bits = rn[i]
                normal = (((bits >> np.uint32(23)) - np.uint32(120)) << np.uint32(3)) | (
                    (bits >> np.uint32(20)) & np.uint32(7)
                )
                code = np.uint32(m) if sub else normal  # m == 8 is the smallest normal
                sign = (yb[i] >> np.uint32(24)) & np.uint32(0x80)
                cs[i] = np.uint8(code | sign)
                f = xs[i]
                q = -g if sign else g
                d = q * s - f
                acc_s += f * f
                acc_e += d * d
            total_s += acc_s
            total_e += acc_e
    sums[0] += total_s
    sums[1] += total_e


STORED_DTYPES = frozenset({torch.bfloat16, torch.float32})
"""Weight dtypes the kernels read directly (others: convert the chunk to float32 first)."""


def _array(x: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU chunk the kernels can read (bfloat16 as its uint16 bits)."""
    if x.dtype not in STORED_DTYPES:
        raise TypeError(f"the CPU kernel reads bfloat16 or float32, not {x.dtype}")
    return (x.view(torch.uint16) if x.dtype == torch.bfloat16 else x).numpy()


def absmax_chunk(x: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """Absmax of each ``block_rows`` x ``block_cols`` group of rows ``x [r, c]`` (float32,
    ``[ceil(r/br), ceil(c/bc)]``); NaN or Inf where a group holds one."""
    rows, cols = x.shape
    shape = (-(-rows // block_rows), -(-cols // block_cols))
    bits = _array(x)
    if x.dtype == torch.bfloat16:
        mask = np.uint16(0x7FFF)
    else:
        bits, mask = bits.view(np.uint32), np.uint32(0x7FFFFFFF)
    out = np.empty(shape, dtype=bits.dtype)
    _absmax_kernel(bits, block_rows, block_cols, out, mask)
    if x.dtype == torch.bfloat16:
        return torch.from_numpy(out).to(torch.int32).bitwise_left_shift(16).view(torch.float32)
    return torch.from_numpy(out).view(torch.float32)


def quantize_chunk(
    x: torch.Tensor,
    scale: torch.Tensor,
    block_rows: int,
    block_cols: int,
    codes: torch.Tensor,
    *,
    fp8: bool,
) -> tuple[float, float]:
    """Quantize rows ``x [r, c]`` (bfloat16 or float32) into ``codes [r, c]`` (int8 or
    float8_e4m3fn, written in place) with ``scale [ceil(r/br), ceil(c/bc)]`` indexed
    ``scale[i // br, j // bc]``.

    Returns ``(Σx², Σ(x − q·s)²)`` of the chunk. Same codes as ``formats.quantize_with_scale``.
    """
    xs = _array(x)
    grid = scale.to(torch.float32).contiguous().numpy()
    sums = np.zeros(2, dtype=np.float64)
    cols = xs.shape[1]
    buf = np.empty(cols, dtype=np.uint32)
    if fp8:
        y, rnd = np.empty(cols, dtype=np.float32), np.empty(cols, dtype=np.uint32)
        _fp8_kernel(
            xs, grid, block_rows, block_cols, codes.view(torch.uint8).numpy(), buf, y, rnd, sums
        )
    else:
        _int8_kernel(xs, grid, block_rows, block_cols, codes.numpy(), buf, sums)
    return float(sums[0]), float(sums[1])
