"""Quantize/dequantize kernels against the PyTorch reference: codes and scales bit for bit.

On CPU the kernels run in Triton's interpreter (``kernel_device`` sets TRITON_INTERPRET=1 before
the kernel modules are imported); the same source runs on a GPU when one is present.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_quantizer.quant_core import dispatch, formats, matmul
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

FORMATS = [
    Format(Kind.FP8, Scaling.TENSOR),
    Format(Kind.FP8, Scaling.ROW),
    Format(Kind.FP8, Scaling.BLOCK, 64),
    Format(Kind.INT8, Scaling.TENSOR),
    Format(Kind.INT8, Scaling.ROW),
    Format(Kind.INT8, Scaling.BLOCK, 64),
    Format(Kind.INT8, Scaling.BLOCK, 32),
]
IDS = [f.label for f in FORMATS]


def weights(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian rows with scales spread over three decades (never zero)."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(torch.randn(rows, 1, generator=g) * 2.0)
    return (torch.randn(rows, cols, generator=g) * row_scale * 0.02).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu().reshape(-1).contiguous(), b.cpu().reshape(-1).contiguous()
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_and_dequantize_match_reference_bit_for_bit(
    kernel_device: torch.device, fmt: Format, dtype: torch.dtype
) -> None:
    # 100 x 200: neither dimension a multiple of the block (padded scale grid).
    w = weights(100, 200, dtype, seed=hash((fmt.label, str(dtype))) % 1000)
    codes, scale = dispatch.quantize(w.to(kernel_device), fmt, backend="triton")
    ref_codes, ref_scale = formats.quantize(w, fmt)
    assert scale.shape == ref_scale.shape == fmt.scale_shape(tuple(w.shape))
    assert same_bits(codes, ref_codes)
    assert same_bits(scale, ref_scale)
    for out in (torch.float32, torch.bfloat16, torch.float16):
        got = dispatch.dequantize(codes, scale, fmt, out, backend="triton")
        assert same_bits(got, formats.dequantize(ref_codes, ref_scale, fmt, out))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_edge_values_match_reference(kernel_device: torch.device, fmt: Format) -> None:
    """Exact ties, -0.0, fp32 subnormals (a whole tiny row and block), zero groups, 3e38."""
    w = weights(128, 192, torch.float32, seed=7)
    w[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, -0.0, 1e-40, -1e-42])
    w[1] = 0.0
    w[2] *= 1e-37
    w[64:128, 128:192] *= 1e-37
    w[70:90, 0:64] = 0.0
    w[5, 5] = 3.0e38
    # Ties: a row whose amax is 127 (INT8 scale 1) holding k + 0.5, and one for FP8 (scale 1)
    # holding midpoints of the E4M3 grid.
    w[3] = torch.linspace(-126.5, 126.5, 192).round() + 0.5
    w[3, 0] = 127.0
    w[4] = torch.linspace(-440, 440, 192)
    w[4, 0] = 448.0
    codes, scale = dispatch.quantize(w.to(kernel_device), fmt, backend="triton")
    ref_codes, ref_scale = formats.quantize(w, fmt)
    assert same_bits(codes, ref_codes)
    assert same_bits(scale, ref_scale)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises_like_the_reference(
    kernel_device: torch.device, fmt: Format, bad: float
) -> None:
    w = weights(64, 96, torch.bfloat16, seed=3)
    w[10, 20] = bad
    with pytest.raises(formats.NonFiniteWeightError):
        formats.quantize(w, fmt)
    with pytest.raises(formats.NonFiniteWeightError):
        dispatch.quantize(w.to(kernel_device), fmt, backend="triton")


def test_non_contiguous_input(kernel_device: torch.device) -> None:
    fmt = Format(Kind.INT8, Scaling.BLOCK, 64)
    w = weights(160, 96, torch.bfloat16, seed=5).t()  # a transposed view
    codes, scale = dispatch.quantize(w.to(kernel_device), fmt, backend="triton")
    ref_codes, ref_scale = formats.quantize(w.contiguous(), fmt)
    assert same_bits(codes, ref_codes) and same_bits(scale, ref_scale)


WEIGHT_LAUNCHES = [  # (scaling, config fields, shape): every kernel path, full and ragged tiles
    ("block", {"groups": 2}, (128, 256)),
    ("block", {"groups": 2}, (100, 200)),
    ("block", {"groups": 4}, (64, 192)),  # more groups per program than the row has
    ("row", {"row_tile": 0, "chunk": 64}, (40, 200)),  # two sweeps over chunks
    ("row", {"row_tile": 0, "chunk": 64}, (32, 256)),
    ("row", {"row_tile": 4}, (40, 200)),
    ("row", {"row_tile": 2}, (32, 256)),
    ("tensor", {"chunk": 512}, (40, 200)),
]


@pytest.mark.parametrize("kind", [Kind.INT8, Kind.FP8])
@pytest.mark.parametrize(
    ("scaling", "fields", "shape"), WEIGHT_LAUNCHES, ids=[str(i) for i in WEIGHT_LAUNCHES]
)
def test_weight_launch_shapes_match_reference(
    kernel_device: torch.device, kind: Kind, scaling: str, fields: dict, shape: tuple
) -> None:
    """Every launch shape of the weight kernels gives the reference's bits, edge values
    included (-0.0, ties, fp32 subnormals, a zero block, the largest float)."""
    kq = dispatch._kernels("quantize")
    fmt = Format(kind, Scaling(scaling), 64 if scaling == "block" else None)
    w = weights(*shape, torch.float32, seed=shape[0] + len(fields))
    w[0, :6] = torch.tensor([0.5, -0.0, 1e-40, -1e-42, 2.5, -1.5])
    w[1, 64:128] *= 1e-37
    w[2:9, :64] = 0.0
    w[5, 70] = 3.0e38
    cfg = kq.WeightConfig(num_warps=1, hw_fp8=False, **fields)
    codes, scale = kq.quantize(w.to(kernel_device), fmt, config=cfg)
    ref_codes, ref_scale = formats.quantize(w, fmt)
    assert same_bits(codes, ref_codes) and same_bits(scale, ref_scale)
    if kind is Kind.FP8:
        assert codes[0, 1].view(torch.uint8).item() == 0x80  # -0.0 keeps its sign


@pytest.mark.parametrize("kind", [Kind.INT8, Kind.FP8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_quantization_matches_reference(
    kernel_device: torch.device, kind: Kind, dtype: torch.dtype
) -> None:
    x = weights(40, 200, dtype, seed=11)
    x[3, 64:128] = 0.0  # an all-zero group gets scale 1
    fmt = Format(kind, Scaling.BLOCK, 64)
    codes, scale = dispatch.quantize_activations(x.to(kernel_device), fmt, backend="triton")
    ref_codes, ref_scale = matmul.quantize_activations(x, kind, 64)
    assert scale.shape == ref_scale.shape == (40, 4)
    assert same_bits(codes, ref_codes)
    assert torch.equal(scale.cpu(), ref_scale)
    # Independent check of the definition: scale = amax of each 1 x 64 group / qmax.
    groups = torch.nn.functional.pad(x.double(), (0, 56)).view(40, 4, 64)
    amax = groups.abs().amax(dim=2)
    want = torch.where(amax > 0, amax / fmt.qmax, torch.ones_like(amax))
    torch.testing.assert_close(scale.cpu().double(), want, rtol=1e-7, atol=0)


@pytest.mark.parametrize("kind", [Kind.INT8, Kind.FP8])
@pytest.mark.parametrize(
    ("tile_r", "groups", "k"),
    [(4, 4, 200), (8, 2, 256), (1, 8, 448)],
    ids=["ragged-k", "exact-tiles", "more-groups-than-k"],
)
def test_activation_launch_shapes_and_edge_values(
    kernel_device: torch.device, kind: Kind, tile_r: int, groups: int, k: int
) -> None:
    """Every launch shape gives the reference's bits, on ties, signed zeros, fp32 subnormals, an
    all-zero group, a group of subnormals (scale clamped to the smallest normal) and the
    largest float (its reciprocal scale is tiny but normal)."""
    gemm_quant = dispatch._kernels("quantize")
    x = weights(21, k, torch.float32, seed=k + tile_r)
    x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -0.0, 1e-40, -1e-42])
    x[0, 6] = 127.0  # group scale 1: the codes of 0.5, 1.5, 2.5 are exact ties
    x[1, :64] = 0.0
    x[2, 64:128] *= 1e-39
    x[4, 5] = 3.0e38
    ref_codes, ref_scale = matmul.quantize_activations(x, kind, 64)
    cfg = gemm_quant.ActConfig(tile_r=tile_r, groups=groups, num_warps=1, hw_fp8=False)
    codes, scale = gemm_quant.quantize_activations(
        x.to(kernel_device), fp8=kind is Kind.FP8, block_size=64, config=cfg
    )
    assert scale.shape == ref_scale.shape and scale.stride(0) == 1  # K-block-major storage
    assert same_bits(codes, ref_codes) and same_bits(scale, ref_scale)
    if kind is Kind.INT8:  # half-to-even ties: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
        assert codes[0, :3].tolist() == [0, 2, 2]
    else:  # -0.0 keeps its sign bit
        assert codes[0, 3].view(torch.uint8).item() == 0x80
    assert ref_scale[2, 1].item() == torch.finfo(torch.float32).tiny


def test_activation_codes_are_x_times_reciprocal_scale_rounded() -> None:
    """The spec against an independent float64 statement of it: codes = RNE(x * (1/scale))
    with 1/scale correctly rounded to float32, saturating at qmax."""
    x = weights(16, 256, torch.bfloat16, seed=5).float()
    for kind, qmax in ((Kind.INT8, 127.0), (Kind.FP8, 448.0)):
        codes, scale = matmul.quantize_activations(x, kind, 128)
        inv = (1.0 / scale.double()).float().double()  # RN(1/scale): exact in float64, rounded
        q = (x.double().view(16, 2, 128) * inv[:, :, None]).float().view(16, 256)
        assert float(q.abs().max()) <= qmax * (1 + 2**-22)
        want = q.round() if kind is Kind.INT8 else q.to(torch.float8_e4m3fn).float()
        assert torch.equal(codes.float(), want)
