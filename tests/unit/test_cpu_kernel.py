"""The fused CPU kernel (numba) against the PyTorch reference in formats: same codes, same scales,
and energies equal to a float64 recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_quantizer.quant_core import dispatch, formats
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

pytest.importorskip("numba")

FORMATS = [
    Format(Kind.FP8, Scaling.TENSOR),
    Format(Kind.FP8, Scaling.ROW),
    Format(Kind.FP8, Scaling.BLOCK, 64),
    Format(Kind.INT8, Scaling.TENSOR),
    Format(Kind.INT8, Scaling.ROW),
    Format(Kind.INT8, Scaling.BLOCK, 48),
]


def edge_weights(dtype: torch.dtype) -> torch.Tensor:
    """Random rows plus rows of values that stress rounding: exact E4M3 and INT8 ties after
    scaling (amax chosen so that the scale is a power of two), subnormal E4M3 codes, signed
    zeros, a zero row. The tensor's absmax is 28 = 448 * 2**-4."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 0, 200)[None, :]
    w = w.clamp(-27, 27)
    w[7] = 0.0
    w[8, ::2] = -0.0
    w[9] = torch.linspace(-1, 1, 200) * 1e-6  # tiny next to the tensor's absmax: subnormals
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3) & (e4m3 >= 0)].sort().values
    ties = (e4m3[1:] + e4m3[:-1]) / 2  # exact midpoints of the E4M3 grid
    w[10, : len(ties)] = ties * 2.0**-4  # row and tensor scale 2**-4: y is exactly a midpoint
    w[10, len(ties)] = 28.0
    w[11] = (torch.arange(200) - 100 + 0.5) * 2.0**-4  # INT8 .5 ties with row scale 2**-4...
    w[11, 0] = 127 * 2.0**-4  # ...as its absmax is 127 * 2**-4
    w[12, 0] = 28.0
    return w.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_same_codes_and_scales_as_the_reference(fmt: Format, dtype: torch.dtype) -> None:
    w = edge_weights(dtype)
    ref_codes, ref_scale = formats.quantize(w, fmt)
    codes, scale, energy, backend = dispatch.quantize_and_measure(w, fmt, backend="numba")
    assert backend == "numba"
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    # energies against float64 math on the reference codes (float32 sums in the kernel)
    w64 = w.double()
    err = w64 - formats.dequantize(ref_codes, ref_scale, fmt, torch.float64)
    assert energy.signal == pytest.approx(float((w64 * w64).sum()), rel=1e-5)
    assert energy.error == pytest.approx(float((err * err).sum()), rel=1e-4)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label)
def test_workers_and_chunking_do_not_change_the_result(
    fmt: Format, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = edge_weights(torch.bfloat16)
    one = dispatch.quantize_and_measure(w, fmt, backend="numba")
    monkeypatch.setattr(formats, "_CHUNK_ELEMENTS", 3000)
    many = dispatch.quantize_and_measure(w, fmt, workers=3, backend="numba")
    assert torch.equal(one[0].view(torch.uint8), many[0].view(torch.uint8))
    assert torch.equal(one[1], many[1])
    assert math.isclose(one[2].sqnr_db, many[2].sqnr_db, abs_tol=1e-4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_non_finite_weights_raise(bad: float, dtype: torch.dtype) -> None:
    w = edge_weights(dtype)
    w[299, 199] = bad  # the last element: the last group of the last chunk
    for fmt in FORMATS:
        with pytest.raises(formats.NonFiniteWeightError):
            dispatch.quantize_and_measure(w, fmt, backend="numba")


def test_absmax_kernel_matches_torch() -> None:
    from comfyui_quantizer.kernels import cpu_quantize

    w = edge_weights(torch.bfloat16)
    rows, cols = w.shape
    for fmt in FORMATS:
        b = fmt.block_size
        br, bc = (b, b) if b else (1, cols) if fmt.scaling is Scaling.ROW else (rows, cols)
        ref = formats.absmax(w, fmt)
        assert torch.equal(cpu_quantize.absmax_chunk(w, br, bc).reshape(ref.shape), ref)


def test_auto_choice_and_explicit_torch() -> None:
    w = edge_weights(torch.bfloat16)
    fmt = FORMATS[0]
    assert dispatch.choose_cpu_kernel(w).backend == "numba"
    ref = dispatch.quantize_and_measure(w, fmt, backend="torch")
    assert ref[3] == "torch"
    assert torch.equal(
        ref[0].view(torch.uint8), dispatch.quantize_and_measure(w, fmt)[0].view(torch.uint8)
    )


def test_a_failing_numba_kernel_falls_back_to_the_same_codes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: if the compiled kernel raises (a broken LLVM, say), the conversion goes
    on with the PyTorch path, says so once, and an explicit ``backend="numba"`` still fails."""
    from comfyui_quantizer.kernels import cpu_quantize

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected kernel failure")

    w = edge_weights(torch.bfloat16)
    fmt = FORMATS[4]
    expected = dispatch.quantize_and_measure(w, fmt, backend="torch")
    monkeypatch.setattr(cpu_quantize, "quantize_chunk", broken)
    monkeypatch.setattr(dispatch, "_numba_failure", None)
    with pytest.raises(RuntimeError, match="injected"):
        dispatch.quantize_and_measure(w, fmt, backend="numba")
    with caplog.at_level("WARNING"):
        codes, scale, _, backend = dispatch.quantize_and_measure(w, fmt)
    assert backend == "torch" and "injected kernel failure" in caplog.text
    assert torch.equal(codes, expected[0]) and torch.equal(scale, expected[1])
    assert dispatch.choose_cpu_kernel(w).backend == "torch"  # not tried again
