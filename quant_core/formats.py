"""Quantization formats as plain PyTorch: scales, codes, dequantization.

This module is the specification. The Triton kernels and the learned-rounding code are tested
against it, so every function here is exact and deterministic on CPU.

Conventions (weights are 2-D ``[out, in]``):

=========================  ===========  =====================================  ===============
format (``comfy_quant``)   codes        ``weight_scale`` (F32, dequant factor)  stock ComfyUI
=========================  ===========  =====================================  ===============
``float8_e4m3fn``          F8_E4M3      ``[]``        = amax / 448              loads
``int8_tensorwise``        I8 (±127)    ``[]`` or ``[out, 1]`` = amax / 127     loads
``float8_e4m3fn_rowwise``  F8_E4M3      ``[out, 1]``                           needs the pack
``float8_e4m3fn_blockwise`` F8_E4M3     ``[ceil(out/B), ceil(in/B)]``          needs the pack
``int8_blockwise``         I8 (±127)    ``[ceil(out/B), ceil(in/B)]``          needs the pack
=========================  ===========  =====================================  ===============

Rounding is round-half-to-even on the target grid with saturation. A shape that is not a
multiple of the block size gets a padded scale grid: the last row/column of blocks simply covers
fewer elements. A group whose values are all zero gets scale 1.0 (any positive scale is exact).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")
FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0

# Rows are processed in chunks of about this many elements; the result is identical to
# whole-tensor math because every step is elementwise. The size trades cache locality of the
# float32 temporaries against the Python work per chunk (which holds the GIL): measured on a
# 2-core VM (L2 2 MB), 2**19 converts INT8 per-row ~20 % faster than 2**17, FP8 no slower.
_CHUNK_ELEMENTS = 1 << 19
# A ChunkKernel reads the stored weight with no float32 temporaries and twice (absmax, then
# codes): twice the elements still fit L2 and amortise the Python work further.
_KERNEL_CHUNK_FACTOR = 2


class NonFiniteWeightError(ValueError):
    """The tensor holds NaN or Inf; the caller adds the file and layer name."""


class Scaling(str, enum.Enum):
    """Scale granularity of a weight ``[out, in]``.

    - ``TENSOR``: one scale, shape ``[]``
    - ``ROW``: one scale per output row, shape ``[out, 1]``
    - ``BLOCK``: one scale per ``B x B`` tile, shape ``[ceil(out/B), ceil(in/B)]``
    """

    TENSOR = "tensor"
    ROW = "row"
    BLOCK = "block"


class Kind(str, enum.Enum):
    """Number format of the codes."""

    FP8 = "fp8"
    INT8 = "int8"


@dataclass(frozen=True)
class Format:
    """One on-disk quantization format: code type, scale granularity and, for blocks, B."""

    kind: Kind
    scaling: Scaling
    block_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "scaling", Scaling(self.scaling))
        if self.scaling is Scaling.BLOCK:
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(
                    f"block scaling needs a positive integer block size, got {self.block_size!r}"
                )
        elif self.block_size is not None:
            object.__setattr__(self, "block_size", None)

    @property
    def name(self) -> str:
        """The ``format`` value written into ``.comfy_quant``."""
        if self.kind is Kind.FP8:
            return {
                Scaling.TENSOR: "float8_e4m3fn",
                Scaling.ROW: "float8_e4m3fn_rowwise",
                Scaling.BLOCK: "float8_e4m3fn_blockwise",
            }[self.scaling]
        return "int8_blockwise" if self.scaling is Scaling.BLOCK else "int8_tensorwise"

    @property
    def label(self) -> str:
        """Short human label, e.g. ``int8/row`` or ``fp8/block128``."""
        suffix = f"block{self.block_size}" if self.scaling is Scaling.BLOCK else self.scaling.value
        return f"{self.kind.value}/{suffix}"

    @property
    def stock_loadable(self) -> bool:
        """Whether an unmodified ComfyUI loads this format (else the pack must be installed)."""
        if self.kind is Kind.FP8:
            return self.scaling is Scaling.TENSOR
        return self.scaling in (Scaling.TENSOR, Scaling.ROW)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kind is Kind.FP8 else torch.int8

    @property
    def qmax(self) -> float:
        return FP8_E4M3_MAX if self.kind is Kind.FP8 else INT8_MAX

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``weight_scale`` for a weight of ``shape`` ``[out, in]``."""
        out_features, in_features = shape
        if self.scaling is Scaling.TENSOR:
            return ()
        if self.scaling is Scaling.ROW:
            return (out_features, 1)
        b = self.block_size
        assert b is not None
        return (math.ceil(out_features / b), math.ceil(in_features / b))

    def comfy_quant(self) -> dict[str, object]:
        """The per-layer JSON stored in ``<layer>.comfy_quant``."""
        conf: dict[str, object] = {"format": self.name}
        if self.scaling is Scaling.BLOCK:
            conf["group_size"] = self.block_size
        return conf


def _row_chunks(
    rows: int, cols: int, align: int = 1, device: torch.device | None = None, factor: int = 1
) -> Iterator[slice]:
    """Row slices of about ``factor * _CHUNK_ELEMENTS`` elements, each a multiple of ``align``.

    Chunking serves CPU caches; on a GPU the whole tensor is one chunk (each chunk ends in a
    host read of its sums, which would otherwise cost a synchronisation per chunk).
    """
    if device is not None and device.type != "cpu":
        yield slice(0, rows)
        return
    step = max(align, (factor * _CHUNK_ELEMENTS // max(cols, 1)) // align * align)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _check_2d(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")


def absmax(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Largest magnitude per scale group, float32, in the shape of ``fmt.scale_shape``.

    NaN and Inf propagate (the caller checks), so the result is exact for any input dtype.
    """
    _check_2d(w)
    if fmt.scaling is Scaling.TENSOR:
        return torch.maximum(w.amax().float(), -w.amin().float())
    rows, cols = w.shape
    b = fmt.block_size or 1
    out = torch.empty(fmt.scale_shape((rows, cols)), dtype=torch.float32, device=w.device)
    for rs in _row_chunks(rows, cols, align=b, device=w.device):
        _scale_grid(out, rs, cols, fmt)[0][...] = _chunk_absmax(w[rs].float(), fmt)
    return out


def _chunk_absmax(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per-group absmax of float32 rows ``[r, cols]`` (``r`` block-aligned; tensor: a scalar).

    ``max(amax, -amin)`` along contiguous rows is several times faster on CPU than ``aminmax``
    or ``abs().amax`` over strided tiles.
    """
    if fmt.scaling is Scaling.TENSOR:
        return torch.maximum(y.amax(), -y.amin())
    if fmt.scaling is Scaling.ROW:
        return torch.maximum(y.amax(dim=1, keepdim=True), -y.amin(dim=1, keepdim=True))
    b = fmt.block_size
    assert b is not None
    pad_r, pad_c = -y.shape[0] % b, -y.shape[1] % b
    if pad_r or pad_c:  # zero padding never raises an absmax
        y = torch.nn.functional.pad(y, (0, pad_c, 0, pad_r))
    tiles = y.view(y.shape[0], y.shape[1] // b, b)
    per_row = torch.maximum(tiles.amax(dim=2), -tiles.amin(dim=2))  # [r, blocks along in]
    return per_row.view(-1, b, per_row.shape[1]).amax(dim=1)


def scale_from_absmax(amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``amax / qmax`` as float32; all-zero groups get 1.0; never zero or subnormal."""
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeightError("weight contains NaN or Inf")
    return absmax_scale(amax, fmt.qmax)


def absmax_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """:func:`scale_from_absmax` without the finiteness check (activations, per forward pass:
    a non-finite input gives a non-finite output)."""
    # Divide by a tensor: torch on CUDA turns division by a Python number into a multiply by its
    # reciprocal, which differs from IEEE division by 1 ulp for up to half of the scales.
    divisor = torch.full((), qmax, dtype=torch.float32, device=amax.device)
    scale = torch.where(
        amax > 0, amax.float() / divisor, torch.ones_like(amax, dtype=torch.float32)
    )
    return scale.clamp_min(torch.finfo(torch.float32).tiny)


def compute_scale(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Absmax scale of ``w`` ``[out, in]`` for ``fmt``: shape ``fmt.scale_shape(w.shape)``, F32."""
    return scale_from_absmax(absmax(w, fmt), fmt)


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], fmt: Format) -> torch.Tensor:
    """Scale broadcastable to ``shape`` ``[out, in]`` (blocks are repeated and cropped)."""
    if fmt.scaling is not Scaling.BLOCK:
        return scale
    b = fmt.block_size
    assert b is not None
    rows, cols = shape
    full = scale.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)
    return full[:rows, :cols]


def round_to_fp8_e4m3_grid(x: torch.Tensor) -> torch.Tensor:
    """Float32 -> float32 on the E4M3 grid, round-half-to-even, saturating at ±448.

    Same result as ``x.clamp(-448, 448).to(torch.float8_e4m3fn)``, written with float32
    arithmetic only so that a kernel (and Triton's interpreter, whose FP8 cast does not round
    to nearest-even) can round first and then cast exactly.
    """
    x = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    _, exponent = torch.frexp(x)  # x = m * 2**exponent with 0.5 <= |m| < 1
    # 3 mantissa bits: the spacing in [2**(e-1), 2**e) is 2**(e-4); subnormals (< 2**-6) 2**-9.
    step = torch.ldexp(torch.ones_like(x), (exponent - 4).clamp_min(-9))
    return torch.round(x / step) * step


def round_to_int8_grid(x: torch.Tensor) -> torch.Tensor:
    """Float32 -> float32 integers in [-127, 127], round-half-to-even."""
    return torch.round(x).clamp(-INT8_MAX, INT8_MAX)


def round_to_grid(x: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Round scaled values (``w / scale``, float32) onto the code grid of ``kind``."""
    return round_to_fp8_e4m3_grid(x) if kind is Kind.FP8 else round_to_int8_grid(x)


def _encode(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Scaled float32 values -> codes (the cast is exact after rounding on the grid)."""
    if fmt.kind is Kind.FP8:
        # torch's float32 -> e4m3fn cast is round-half-to-even; clamp first because values
        # above 448 would become NaN (e4m3fn has no infinity).
        return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return round_to_int8_grid(x).to(torch.int8)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes of ``w`` ``[out, in]`` for a given scale: ``round(w / scale)`` on the grid."""
    codes, _, _ = _quantize_rows(w, fmt, scale, measure=False)
    return codes


class ChunkKernel(Protocol):
    """A faster implementation of this module's per-chunk math, same results (see ``dispatch``).

    Both methods take rows ``x [r, c]`` of the weight in one of ``dtypes`` (other dtypes are
    converted to float32 first) and groups of ``block_rows`` x ``block_cols`` elements that share
    a scale (``_scale_grid``).
    """

    dtypes: frozenset[torch.dtype]

    def absmax(self, x: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
        """Float32 absmax of each group, ``[ceil(r/br), ceil(c/bc)]``; not finite if any
        element of the group is not."""
        ...

    def quantize(
        self, x: torch.Tensor, grid: torch.Tensor, block_rows: int, block_cols: int,
        codes: torch.Tensor,
    ) -> tuple[float, float]:  # fmt: skip
        """Fill ``codes [r, c]`` for the scale ``grid``; return ``(Σx², Σ(x − q·s)²)``."""
        ...


def quantize_and_measure(
    w: torch.Tensor,
    fmt: Format,
    scale: torch.Tensor | None = None,
    *,
    workers: int = 1,
    chunk_kernel: ChunkKernel | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ErrorEnergy]:
    """Round-to-nearest codes, scale and error energy of ``w`` ``[out, in]``.

    The conversion hot path. Rows are processed in cache-sized chunks, each read once: row and
    block scales are computed inside the chunk (only a tensor-wide scale needs a pass of its
    own), and the error comes from the grid values themselves. ``workers`` > 1 processes chunks
    in that many threads (torch releases the GIL); results do not depend on it. A
    ``chunk_kernel`` (from ``dispatch``) replaces the per-chunk PyTorch steps. ``out`` (codes
    dtype, ``w``'s shape and device) receives the codes instead of a new tensor.
    """
    _check_2d(w)
    if scale is None and fmt.scaling is Scaling.TENSOR:
        rows, cols = w.shape

        def part(rs: slice) -> torch.Tensor:
            if chunk_kernel is None:
                return _chunk_absmax(w[rs].float(), fmt)
            return chunk_kernel.absmax(_kernel_input(w[rs], chunk_kernel), rs.stop - rs.start, cols)

        factor = 1 if chunk_kernel is None else _KERNEL_CHUNK_FACTOR
        chunks = _row_chunks(rows, cols, device=w.device, factor=factor)
        scale = scale_from_absmax(torch.stack(_map_chunks(part, chunks, workers)).amax(), fmt)
    codes, scale, energy = _quantize_rows(
        w, fmt, scale, measure=True, workers=workers, chunk_kernel=chunk_kernel, out=out
    )
    assert energy is not None
    return codes, scale, energy


def _quantize_rows(
    w: torch.Tensor,
    fmt: Format,
    scale: torch.Tensor | None,
    *,
    measure: bool,
    workers: int = 1,
    chunk_kernel: ChunkKernel | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ErrorEnergy | None]:
    _check_2d(w)
    rows, cols = w.shape
    if out is None:
        codes = torch.empty(rows, cols, dtype=fmt.code_dtype, device=w.device)
    elif out.shape != w.shape or out.dtype != fmt.code_dtype or out.device != w.device:
        raise ValueError(
            f"out must be {fmt.code_dtype} {list(w.shape)} on {w.device}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}"
        )
    else:
        codes = out
    given = scale is not None
    if scale is None:
        scale = torch.empty(fmt.scale_shape((rows, cols)), dtype=torch.float32, device=w.device)
    b = fmt.block_size if fmt.scaling is Scaling.BLOCK else 1
    assert b is not None

    def kernel_chunk(rs: slice) -> tuple[float, float]:
        assert chunk_kernel is not None and scale is not None
        x = _kernel_input(w[rs], chunk_kernel)
        grid, block_rows, block_cols = _scale_grid(scale, rs, cols, fmt)
        if not given:
            grid[...] = scale_from_absmax(chunk_kernel.absmax(x, block_rows, block_cols), fmt)
        return chunk_kernel.quantize(x, grid, block_rows, block_cols, codes[rs])

    def one_chunk(rs: slice) -> tuple[float, float]:
        # In-place steps on one float32 copy of the chunk: the same values as _encode(w / s),
        # with a third of the memory traffic.
        y = w[rs].to(torch.float32, copy=True)
        if not given:  # row or block scales of these rows only (chunks are block-aligned)
            _scale_grid(scale, rs, cols, fmt)[0][...] = scale_from_absmax(
                _chunk_absmax(y, fmt), fmt
            )
        s = _scale_rows(scale, rs, (rows, cols), fmt)
        signal = error = 0.0
        if measure:
            flat = y.reshape(-1)
            signal = float(torch.dot(flat, flat))  # float32 BLAS per chunk, summed in double
        y.div_(s).clamp_(-fmt.qmax, fmt.qmax)
        if fmt.kind is Kind.FP8:
            codes[rs].copy_(y)  # round-half-to-even cast straight into the output
            grid = _decode(codes[rs]) if measure else None
        else:
            grid = torch.round(y)
            codes[rs].copy_(grid)  # exact: the values are already integers
        if measure:
            assert grid is not None
            diff = grid.sub_(y).mul_(s).reshape(-1)
            error = float(torch.dot(diff, diff))
        return signal, error

    if chunk_kernel is None:
        parts = _map_chunks(one_chunk, _row_chunks(rows, cols, align=b, device=w.device), workers)
    else:
        chunks = _row_chunks(rows, cols, align=b, device=w.device, factor=_KERNEL_CHUNK_FACTOR)
        parts = _map_chunks(kernel_chunk, chunks, workers)
    if not measure:
        return codes, scale, None
    # Summed in chunk order, so the result does not depend on the number of workers.
    return codes, scale, ErrorEnergy(math.fsum(p[0] for p in parts), math.fsum(p[1] for p in parts))


def _kernel_input(x: torch.Tensor, kernel: ChunkKernel) -> torch.Tensor:
    return x if x.dtype in kernel.dtypes else x.to(torch.float32)


def _scale_grid(
    scale: torch.Tensor, rs: slice, cols: int, fmt: Format
) -> tuple[torch.Tensor, int, int]:
    """The scales of rows ``rs`` as a 2-D grid (a view: writable) and the rows/columns each grid
    cell covers."""
    n = rs.stop - rs.start
    if fmt.scaling is Scaling.TENSOR:
        return scale.reshape(1, 1), n, cols
    if fmt.scaling is Scaling.ROW:
        return scale[rs], 1, cols
    b = fmt.block_size
    assert b is not None
    return scale[rs.start // b : math.ceil(rs.stop / b)], b, b


def _map_chunks(fn: Callable[[slice], T], chunks: Iterable[slice], workers: int) -> list[T]:
    """``[fn(rs) for rs in chunks]``, in that order, on ``workers`` threads when > 1.

    Each thread takes every ``workers``-th chunk in one task (a task per chunk would cost more
    in thread hand-offs than the chunk's math).
    """
    chunks = list(chunks)
    if workers <= 1 or len(chunks) <= 1:
        return [fn(rs) for rs in chunks]
    n = min(workers, len(chunks))
    # Inference mode is thread-local: carry the caller's into the workers (ComfyUI runs nodes
    # under it, and tensors created there may only be updated in place under it).
    inference = torch.is_inference_mode_enabled()

    def lane(k: int) -> list[T]:
        with torch.inference_mode(inference):
            return [fn(rs) for rs in chunks[k::n]]

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="quantize") as pool:
        lanes = list(pool.map(lane, range(n)))
    out: list[T] = [None] * len(chunks)  # type: ignore[list-item]
    for k, lane in enumerate(lanes):
        out[k::n] = lane
    return out


@functools.cache
def _fp8_table() -> torch.Tensor:
    """The float32 value of every E4M3 bit pattern (decoding by table is ~6x faster on CPU)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _decode(codes: torch.Tensor) -> torch.Tensor:
    """Codes -> float32 grid values (exact)."""
    if codes.dtype == torch.float8_e4m3fn and codes.device.type == "cpu":
        flat = codes.reshape(-1).view(torch.uint8).int()
        return torch.index_select(_fp8_table(), 0, flat).reshape(codes.shape)
    return codes.float()


def quantize(w: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization: ``[out, in]`` -> codes ``[out, in]``, scale (F32)."""
    scale = compute_scale(w, fmt)
    return quantize_with_scale(w, scale, fmt), scale


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, fmt: Format, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Codes and scale -> ``codes * scale`` in float32, then cast to ``dtype``."""
    full = expand_scale(scale.float(), tuple(codes.shape), fmt)
    return (_decode(codes) * full).to(dtype)


def _scale_rows(
    scale: torch.Tensor, rs: slice, shape: tuple[int, int], fmt: Format
) -> torch.Tensor:
    """The part of the (expanded) scale that covers rows ``rs``."""
    if fmt.scaling is not Scaling.BLOCK:
        return scale if fmt.scaling is Scaling.TENSOR else scale[rs]
    block_rows, b, _ = _scale_grid(scale, rs, shape[1], fmt)
    sub = expand_scale(block_rows, (block_rows.shape[0] * b, shape[1]), fmt)
    return sub[: rs.stop - rs.start]


@dataclass(frozen=True)
class ErrorEnergy:
    """Sums over a tensor, in float64: signal ``Σw²`` and error ``Σ(w - ŵ)²``."""

    signal: float
    error: float

    @property
    def sqnr_db(self) -> float:
        """``10·log10(Σw² / Σ(w-ŵ)²)``; +inf for an exact result, -inf for a zero signal."""
        return sqnr_db(self.signal, self.error)


def sqnr_db(signal: float, error: float) -> float:
    """Signal-to-quantization-noise ratio in dB from energies (sums of squares)."""
    if error <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / error)


def error_energy(
    w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fmt: Format
) -> ErrorEnergy:
    """Signal and quantization-error energy of ``codes * scale`` against ``w``."""
    rows, cols = w.shape
    signal = error = 0.0
    align = fmt.block_size if fmt.scaling is Scaling.BLOCK else 1
    for rs in _row_chunks(rows, cols, align=align or 1, device=w.device):
        x = w[rs].float()
        diff = (
            _decode(codes[rs]).mul_(_scale_rows(scale, rs, (rows, cols), fmt)).sub_(x).reshape(-1)
        )
        flat = x.reshape(-1)
        signal += float(torch.dot(flat, flat))
        error += float(torch.dot(diff, diff))
    return ErrorEnergy(signal, error)
