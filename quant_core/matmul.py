"""Block-scaled linear in plain PyTorch: the specification the GEMM kernels are tested against.

``y = x @ W.T + bias`` where W ``[N, K]`` is stored as 8-bit codes in ``B x B`` blocks with
scales ``[ceil(N/B), ceil(K/B)]`` (``Format(kind, Scaling.BLOCK, B)``), and x ``[..., K]`` is
quantized on the fly per ``1 x B`` group along K (scale = absmax/127 for INT8, absmax/448 for
FP8 E4M3, an all-zero group gets scale 1; codes = x times the reciprocal of the scale, rounded
half-to-even onto the grid, saturating).

Per K-block ``kb`` (DeepSeek-V3 / JetFire style)::

    P[m, n]  = sum over k in kb of qa[m, k] * qw[n, k]     (exact int for INT8; fp32 for FP8)
    acc     += P * (a_scale[m, kb] * w_scale[n // B, kb])   (fp32)
    y        = (acc + bias).to(out_dtype)

A K or N that is not a multiple of B uses the padded scale grid: the last block is narrower.
"""

from __future__ import annotations

import math

import torch

from .formats import Format, Kind, Scaling, absmax_scale, round_to_grid


def check_block_linear_args(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fmt: Format
) -> None:
    """Raise ``ValueError`` naming the mismatch when the operands do not fit together."""
    if fmt.scaling is not Scaling.BLOCK or fmt.block_size is None:
        raise ValueError(f"block_scaled_linear needs a block format, got {fmt.label}")
    if codes.dim() != 2:
        raise ValueError(f"weight codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype != fmt.code_dtype:
        raise ValueError(f"weight codes are {codes.dtype}, {fmt.label} needs {fmt.code_dtype}")
    if x.shape[-1] != codes.shape[1]:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={codes.shape[1]}")
    want = fmt.scale_shape(tuple(codes.shape))
    if tuple(scale.shape) != want:
        raise ValueError(f"weight scale has shape {tuple(scale.shape)}, expected {want}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")


def quantize_activations(
    x: torch.Tensor, kind: Kind, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``1 x B`` groups along K: ``[M, K]`` -> codes ``[M, K]``, scale ``[M, ceil(K/B)]`` F32.

    No NaN check (this runs per forward pass): a non-finite input gives a non-finite output.
    """
    rows, cols = x.shape
    b = block_size
    groups = math.ceil(cols / b)
    xf = torch.nn.functional.pad(x.float(), (0, groups * b - cols)).view(rows, groups, b)
    amax = xf.abs().amax(dim=2)
    scale = absmax_scale(amax, Format(kind, Scaling.TENSOR).qmax)
    # Codes are x times the (IEEE, correctly rounded) reciprocal of the scale: one multiply
    # per element in the kernels, which run once per forward pass at memory speed (an exact
    # per-element quotient costs them ~4 more FMAs). scale >= the smallest normal float, so
    # the reciprocal is finite, and |q| <= qmax * (1 + 2**-22) still rounds to at most qmax.
    inv = torch.ones_like(scale) / scale
    q = round_to_grid(xf * inv[:, :, None], kind).view(rows, groups * b)[:, :cols]
    return q.to(torch.float8_e4m3fn if kind is Kind.FP8 else torch.int8), scale


def block_scaled_mm_reference(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    block_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Quantized operands -> ``[M, N]``: per-K-block exact products, scaled and summed in fp32.

    ``a_codes`` ``[M, K]``, ``a_scale`` ``[M, ceil(K/B)]``; ``w_codes`` ``[N, K]``,
    ``w_scale`` ``[ceil(N/B), ceil(K/B)]``.
    """
    m, k = a_codes.shape
    n = w_codes.shape[0]
    b = block_size
    w_scale_rows = w_scale.float().repeat_interleave(b, dim=0)[:n]  # [N, KB]
    a_scale = a_scale.float()
    acc = torch.zeros(m, n, dtype=torch.float32, device=a_codes.device)
    for kb in range(math.ceil(k / b)):
        ks = slice(kb * b, min(k, (kb + 1) * b))
        # fp32 products of 8-bit codes are exact; for INT8 the sum (< 2**21) is exact too.
        part = a_codes[:, ks].float() @ w_codes[:, ks].float().T
        acc += part * (a_scale[:, kb, None] * w_scale_rows[None, :, kb])
    if bias is not None:
        acc += bias.float()
    return acc.to(out_dtype)


def block_scaled_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x`` ``[..., K]`` times block-quantized ``W`` ``[N, K]`` -> ``[..., N]`` (see module doc).

    ``scale``: F32 ``[ceil(N/B), ceil(K/B)]``; ``bias``: ``[N]`` or None; ``out_dtype`` defaults
    to ``x.dtype``.
    """
    check_block_linear_args(x, codes, scale, fmt)
    assert fmt.block_size is not None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a_codes, a_scale = quantize_activations(x2, fmt.kind, fmt.block_size)
    y = block_scaled_mm_reference(
        a_codes,
        a_scale,
        codes,
        scale,
        block_size=fmt.block_size,
        bias=bias,
        out_dtype=out_dtype or x.dtype,
    )
    return y.reshape(*lead, codes.shape[0])
