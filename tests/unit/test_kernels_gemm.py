"""Block-scaled linear: Triton kernel and PyTorch reference against float64 math.

Reference values are computed here in float64 from the quantized operands (the kernel's own
arithmetic error, bounded by fp32 sums and the output rounding) and from the unquantized
operands (the format's quantization error, which no kernel can remove).
"""

from __future__ import annotations

import pytest
import torch

from comfyui_quantizer.quant_core import dispatch, formats, matmul
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

B = 64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.cpu().double(), b.cpu().double()
    return float((a64 - b64).norm() / b64.norm())


def operands(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g) * 0.1
    return x, w, bias


def float64_of_quantized(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fmt: Format, bias: torch.Tensor
) -> torch.Tensor:
    """Independent float64 evaluation of the quantized product (activation codes included)."""
    m, k = x.shape
    groups = -(-k // B)
    xg = torch.nn.functional.pad(x.double(), (0, groups * B - k)).view(m, groups, B)
    amax = xg.abs().amax(dim=2, keepdim=True)
    a_scale = torch.where(amax > 0, amax / fmt.qmax, torch.ones_like(amax)).float().double()
    a_codes = matmul.quantize_activations(x, fmt.kind, B)[0]
    deq_x = a_codes.double().view(m, -1) * a_scale.expand(m, groups, B).reshape(m, -1)[:, :k]
    deq_w = codes.double() * formats.expand_scale(scale.double(), tuple(codes.shape), fmt)
    return deq_x @ deq_w.T + bias.double()


@pytest.mark.parametrize("kind", [Kind.INT8, Kind.FP8])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(40, 200, 136), (48, 256, 192), (33, 208, 64)],
    ids=["ragged-pointer-loads", "tma-aligned", "tma-ragged-k"],
)
def test_kernel_against_float64(
    kernel_device: torch.device, kind: Kind, m: int, k: int, n: int
) -> None:
    fmt = Format(kind, Scaling.BLOCK, B)
    x, w, bias = operands(m, k, n, seed=m + k + n)
    codes, scale = formats.quantize(w, fmt)
    want = float64_of_quantized(x, codes, scale, fmt, bias)
    dev = kernel_device
    args = (x.to(dev), codes.to(dev), scale.to(dev), fmt, bias.to(dev))
    got32 = dispatch.block_scaled_linear(*args, torch.float32, backend="triton")
    got16 = dispatch.block_scaled_linear(*args, backend="triton")
    assert got16.dtype == torch.bfloat16 and got16.shape == (m, n)
    # fp32 sums of exact 8-bit products (FP8 tensor cores on a GPU keep fewer bits: 1e-3).
    assert rel(got32, want) < (1e-6 if dev.type == "cpu" or kind is Kind.INT8 else 1e-3)
    assert rel(got16, want) < 8e-3  # + bf16 output rounding
    # The quantization error itself, vs the unquantized product: ~1.1 % INT8, ~3.7 % FP8.
    exact = x.double() @ w.double().T + bias.double()
    assert rel(got32, exact) < (2e-2 if kind is Kind.INT8 else 6e-2)


@pytest.mark.parametrize("kind", [Kind.INT8, Kind.FP8])
def test_reference_against_float64(kind: Kind) -> None:
    fmt = Format(kind, Scaling.BLOCK, B)
    x, w, bias = operands(24, 200, 72, seed=1)
    codes, scale = formats.quantize(w, fmt)
    got = matmul.block_scaled_linear_reference(x, codes, scale, fmt, bias, torch.float32)
    assert rel(got, float64_of_quantized(x, codes, scale, fmt, bias)) < 1e-6


def test_leading_dims_bias_and_output_dtypes(kernel_device: torch.device) -> None:
    fmt = Format(Kind.INT8, Scaling.BLOCK, B)
    x, w, bias = operands(40, 192, 64, seed=2)
    codes, scale = formats.quantize(w, fmt)
    x3 = x.view(2, 20, 192).to(kernel_device)
    for out in (None, torch.float16, torch.float32):
        got = dispatch.block_scaled_linear(
            x3, codes.to(kernel_device), scale.to(kernel_device), fmt, bias.to(kernel_device),
            out, backend="triton",
        )  # fmt: skip
        ref = matmul.block_scaled_linear_reference(x.view(2, 20, 192), codes, scale, fmt, bias, out)
        assert got.shape == (2, 20, 64) and got.dtype == (out or torch.bfloat16)
        # One output rounding apart (Triton's interpreter truncates float32 -> bf16).
        assert rel(got, ref) < (8e-3 if out is None else 2e-3)
    no_bias = dispatch.block_scaled_linear(
        x3, codes.to(kernel_device), scale.to(kernel_device), fmt, backend="triton"
    )
    ref = matmul.block_scaled_linear_reference(x.view(2, 20, 192), codes, scale, fmt)
    assert rel(no_bias, ref) < 8e-3


def test_kernel_variants_agree(kernel_device: torch.device) -> None:
    """Pipelined, magic-conversion, pointer-load and persistent variants compute the same sums."""
    gemm = dispatch._kernels("block_gemm")
    fmt = Format(Kind.INT8, Scaling.BLOCK, B)
    x, w, _ = operands(40, 256, 128, seed=4)
    codes, scale = formats.quantize(w, fmt)
    a_codes, a_scale = matmul.quantize_activations(x, Kind.INT8, B)
    dev = kernel_device
    ops = (a_codes.to(dev), a_scale.to(dev), codes.to(dev), scale.to(dev))
    base = gemm.block_scaled_mm(*ops, block_size=B, bias=None, out_dtype=torch.float32)
    for cfg in (
        gemm.GemmConfig(64, 64, 4, 2, pipeline=True),
        gemm.GemmConfig(64, 64, 4, 2, magic_cvt=True),
        gemm.GemmConfig(32, 64, 4, 2, use_tma=False),
        gemm.GemmConfig(32, 64, 4, 2, persistent=3),  # 3 programs for 4 tiles
    ):
        got = gemm.block_scaled_mm(
            *ops, block_size=B, bias=None, out_dtype=torch.float32, config=cfg
        )
        assert rel(got, base) < 1e-6, cfg


def test_bad_operands_raise() -> None:
    fmt = Format(Kind.INT8, Scaling.BLOCK, B)
    x, w, _ = operands(8, 128, 64, seed=0)
    codes, scale = formats.quantize(w, fmt)
    with pytest.raises(ValueError, match="K=100"):
        dispatch.block_scaled_linear(x[:, :100], codes, scale, fmt)
    with pytest.raises(ValueError, match="expected"):
        dispatch.block_scaled_linear(x, codes, scale[:, :1], fmt)
    with pytest.raises(ValueError, match="block format"):
        dispatch.block_scaled_linear(x, codes, scale, Format(Kind.INT8, Scaling.ROW))
