"""Formats against independent float64 math: grids, scales, error bounds and SQNR levels."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_quantizer.quant_core import formats
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

FP8_T = Format(Kind.FP8, Scaling.TENSOR)
FP8_R = Format(Kind.FP8, Scaling.ROW)
FP8_B = Format(Kind.FP8, Scaling.BLOCK, 128)
INT8_T = Format(Kind.INT8, Scaling.TENSOR)
INT8_R = Format(Kind.INT8, Scaling.ROW)
INT8_B = Format(Kind.INT8, Scaling.BLOCK, 128)
ALL = [FP8_T, FP8_R, FP8_B, INT8_T, INT8_R, INT8_B]


def sqnr64(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Reference SQNR in float64, independent of formats.error_energy."""
    w64, e64 = w.double(), w.double() - w_hat.double()
    return 10 * math.log10(float((w64 * w64).sum()) / float((e64 * e64).sum()))


def fp8_e4m3_values() -> torch.Tensor:
    """Every finite E4M3 value, as float64, from the bit patterns (independent of torch's cast)."""
    vals = []
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exp, man = (bits >> 3) & 0xF, bits & 0x7
        if exp == 0xF and man == 0x7:
            continue  # NaN
        vals.append(sign * (man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)))
    return torch.tensor(sorted(set(vals)), dtype=torch.float64)


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))


def test_format_names_and_loadability() -> None:
    assert [f.name for f in ALL] == [
        "float8_e4m3fn", "float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise",
        "int8_tensorwise", "int8_tensorwise", "int8_blockwise",
    ]  # fmt: skip
    assert [f.stock_loadable for f in ALL] == [True, False, False, True, True, False]
    assert FP8_B.comfy_quant() == {"format": "float8_e4m3fn_blockwise", "group_size": 128}
    assert INT8_R.comfy_quant() == {"format": "int8_tensorwise"}


def test_scale_shapes_pad_the_block_grid() -> None:
    assert FP8_T.scale_shape((300, 200)) == ()
    assert INT8_R.scale_shape((300, 200)) == (300, 1)
    assert INT8_B.scale_shape((300, 200)) == (3, 2)
    assert Format(Kind.INT8, Scaling.BLOCK, 64).scale_shape((128, 64)) == (2, 1)


def test_fp8_grid_rounding_is_nearest_even_on_the_e4m3_grid() -> None:
    grid = fp8_e4m3_values()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: must go to the even mantissa
    g = torch.Generator().manual_seed(1)
    logs = torch.empty(200_000).uniform_(-12, 9.5, generator=g)
    rand = torch.exp2(logs) * torch.sign(torch.randn(200_000, generator=g))
    x = torch.cat([grid, mids, rand.double(), torch.tensor([500.0, -1e6, 464.0, 0.0])]).float()
    ours = formats.round_to_fp8_e4m3_grid(x).double()
    # Independent reference: nearest grid value in float64, ties to the even bit pattern.
    idx = torch.searchsorted(grid, x.double().clamp(-448, 448))
    lo, hi = grid[(idx - 1).clamp(min=0)], grid[idx.clamp(max=len(grid) - 1)]
    xd = x.double().clamp(-448, 448)
    d_lo, d_hi = (xd - lo).abs(), (hi - xd).abs()
    hi_even = (torch.tensor([_bits(v) for v in hi.tolist()]) & 1) == 0
    ref = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(hi_even, hi, lo)))
    assert torch.equal(ours, ref)
    # ...and the explicit grid rounding agrees bit for bit with torch's own cast.
    assert torch.equal(
        formats.round_to_fp8_e4m3_grid(x).to(torch.float8_e4m3fn).view(torch.uint8),
        x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8),
    )


def _bits(v: float) -> int:
    return int(torch.tensor([v]).float().to(torch.float8_e4m3fn).view(torch.uint8)[0])


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.label)
def test_error_within_half_a_step_float64(fmt: Format) -> None:
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    w[7, 3] = 40.0  # an outlier: saturation must happen only above amax, never here
    codes, scale = formats.quantize(w, fmt)
    assert codes.dtype == fmt.code_dtype and tuple(scale.shape) == fmt.scale_shape((300, 200))
    s = formats.expand_scale(scale.double(), (300, 200), fmt).expand(300, 200)
    w_hat = codes.double() * s
    err = (w.double() - w_hat).abs()
    if fmt.kind is Kind.INT8:
        bound = s / 2
    else:  # half the E4M3 spacing at the value's own binade, relative to the scaled value
        x = (w.double() / s).abs().clamp(min=2.0**-6)
        bound = torch.exp2(torch.floor(torch.log2(x)) - 4) * s
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert torch.allclose(formats.dequantize(codes, scale, fmt).double(), w_hat)


@pytest.mark.parametrize(
    ("fmt", "low", "high"),
    [(FP8_T, 31.3, 31.7), (FP8_R, 31.3, 31.7), (FP8_B, 31.3, 31.7),
     (INT8_T, 30.0, 40.0), (INT8_R, 41.0, 43.0), (INT8_B, 40.0, 45.0)],
    ids=lambda v: v.label if isinstance(v, Format) else str(v),
)  # fmt: skip
def test_sqnr_on_gaussian_4096(
    gaussian: torch.Tensor, fmt: Format, low: float, high: float
) -> None:
    codes, scale = formats.quantize(gaussian, fmt)
    db = sqnr64(gaussian, formats.dequantize(codes, scale, fmt))
    assert low <= db <= high
    # float32 dot products per chunk: agreement with float64 to well under 0.001 dB.
    assert formats.error_energy(gaussian, codes, scale, fmt).sqnr_db == pytest.approx(db, abs=1e-4)


def test_int8_block_rounding_beats_truncation_by_about_6_db(gaussian: torch.Tensor) -> None:
    codes, scale = formats.quantize(gaussian, INT8_B)
    s = formats.expand_scale(scale, tuple(gaussian.shape), INT8_B)
    truncated = torch.trunc(gaussian / s).clamp(-127, 127) * s  # what the reference kernel does
    gain = sqnr64(gaussian, formats.dequantize(codes, scale, INT8_B)) - sqnr64(gaussian, truncated)
    assert 5.0 <= gain <= 7.0


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.label)
def test_zero_and_constant_tensors_get_valid_scales(fmt: Format) -> None:
    for w in (torch.zeros(256, 256), torch.full((256, 256), -0.25)):
        codes, scale = formats.quantize(w, fmt)
        assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
        assert torch.equal(formats.dequantize(codes, scale, fmt), w)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.label)
def test_non_finite_weights_raise(fmt: Format, bad: float) -> None:
    w = torch.randn(256, 256)
    w[100, 200] = bad
    with pytest.raises(formats.NonFiniteWeightError):
        formats.quantize(w, fmt)


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.label)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_math_equals_whole_tensor_math(
    fmt: Format, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = torch.randn(520, 136, generator=torch.Generator().manual_seed(3)).to(dtype)
    w_before = w.clone()
    whole_scale = formats.scale_from_absmax(_absmax_whole(w.float(), fmt), fmt)
    whole_codes = formats._encode(
        w.float() / formats.expand_scale(whole_scale, (520, 136), fmt), fmt
    )
    monkeypatch.setattr(formats, "_CHUNK_ELEMENTS", 1000)  # many small chunks
    codes, scale = formats.quantize(w, fmt)
    assert torch.equal(scale, whole_scale)
    assert torch.equal(codes.view(torch.uint8), whole_codes.view(torch.uint8))
    # The fused hot path gives the same codes, and energies equal to the separate measurement.
    fused_codes, fused_scale, energy = formats.quantize_and_measure(w, fmt)
    assert torch.equal(fused_codes.view(torch.uint8), whole_codes.view(torch.uint8))
    assert torch.equal(fused_scale, whole_scale)
    separate = formats.error_energy(w, whole_codes, whole_scale, fmt)
    assert energy.signal == pytest.approx(separate.signal, rel=1e-5)
    assert energy.error == pytest.approx(separate.error, rel=1e-4)
    assert torch.equal(w, w_before)  # the input is never modified in place
    threaded = formats.quantize_and_measure(w, fmt, workers=3)
    assert torch.equal(threaded[0].view(torch.uint8), fused_codes.view(torch.uint8))
    assert torch.equal(threaded[1], fused_scale) and threaded[2] == energy


def _absmax_whole(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Absmax per group by explicit loops over groups (reference for the vectorised version)."""
    if fmt.scaling is Scaling.TENSOR:
        return w.abs().max()
    if fmt.scaling is Scaling.ROW:
        return w.abs().amax(dim=1, keepdim=True)
    b = fmt.block_size
    gr, gc = fmt.scale_shape(tuple(w.shape))
    out = torch.empty(gr, gc)
    for i in range(gr):
        for j in range(gc):
            out[i, j] = w[i * b : (i + 1) * b, j * b : (j + 1) * b].abs().max()
    return out
