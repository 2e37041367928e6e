"""CPU kernel: scale, round, encode and measure a chunk of rows in one pass (numba).

The PyTorch reference (``formats._quantize_rows``) takes about ten whole-chunk operations per
chunk; on a memory-starved machine each costs a pass over the data. This kernel does the same
arithmetic element by element in one loop: ``y = clamp(x / s)``, round half to even on the
target grid, store the code, and accumulate ``Σx²`` and ``Σ(x − q·s)²`` for the weight SQNR.
Codes are bit-identical to the reference: the division is IEEE (numba's fastmath is limited to
re-associating the two sums, which only reorders float32 additions of the measurements), the
INT8 rounding is ``rint`` and the E4M3 rounding is done on the float32 bit pattern.

Memory traffic per element: read 4 bytes (the float32 chunk the caller converted, in cache), write
1 byte. Imported lazily by ``quant_core.dispatch``; needs numba (optional: without it the
PyTorch reference runs).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

# fastmath limited to reassociation (and signed zeros): the two float32 sums may be vectorised,
# while every division, comparison and rounding stays IEEE-exact.
_FLAGS = {"reassoc", "nsz"}


# Each row is walked in segments that share one scale (the whole row for tensor/row scales, B
# columns for blocks), each a 1-D slice indexed from 0: with a scalar scale and indices numba
# knows are non-negative (no wrap-around check), LLVM vectorises the loops (~3-4x faster).


@njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def _int8_kernel(x, scale, br, bc, codes, sums):  # pragma: no cover - compiled
    rows, cols = x.shape
    total_s = 0.0
    total_e = 0.0
    for r in range(rows):
        srow = scale[r // br]
        for j in range(srow.shape[0]):
            s = srow[j]
            end = min(cols, (j + 1) * bc)
            xs = x[r, j * bc : end]
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


@njit(cache=True, nogil=True, fastmath=_FLAGS, boundscheck=False)
def _fp8_kernel(x, scale, br, bc, codes, y, rnd, sums):  # pragma: no cover - compiled
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
            xs = x[r, j * bc : end]
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
                m = np.rint(a * np.float32(512.0))  # subnormal range: step 2**-9, exact scaling
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


def quantize_chunk(
    x: torch.Tensor,
    scale: torch.Tensor,
    block_rows: int,
    block_cols: int,
    codes: torch.Tensor,
    *,
    fp8: bool,
) -> tuple[float, float]:
    """Quantize float32 rows ``x [r, c]`` into ``codes [r, c]`` (int8 or float8_e4m3fn, written
    in place) with ``scale [ceil(r/br), ceil(c/bc)]`` indexed ``scale[i // br, j // bc]``.

    Returns ``(Σx², Σ(x − q·s)²)`` of the chunk. Same codes as ``formats.quantize_with_scale``.
    """
    xs = x.numpy()
    grid = scale.to(torch.float32).contiguous().numpy()
    sums = np.zeros(2, dtype=np.float64)
    cols = xs.shape[1]
    if fp8:
        y, rnd = np.empty(cols, dtype=np.float32), np.empty(cols, dtype=np.uint32)
        u8 = codes.view(torch.uint8).numpy()
        _fp8_kernel(xs, grid, block_rows, block_cols, u8, y, rnd, sums)
    else:
        _int8_kernel(xs, grid, block_rows, block_cols, codes.numpy(), sums)
    return float(sums[0]), float(sums[1])
