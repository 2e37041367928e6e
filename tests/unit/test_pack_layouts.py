"""Pack-only layouts on CPU, without ComfyUI: layout math against float64 references and
quant_core, run through comfy-kitchen's real ``QuantizedTensor`` (the type ComfyUI uses)."""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import pytest
import torch

from comfyui_quantizer.nodes import comfy_runtime, layout_math
from comfyui_quantizer.quant_core import formats
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
from comfyui_quantizer.nodes import layouts  # noqa: E402  (needs comfy-kitchen)

QuantizedTensor = ck_tensor.QuantizedTensor

# (format name, block size): B=32 tiles the test shapes exactly, B=48 leaves a padded grid.
CASES = [
    ("int8_blockwise", 32),
    ("int8_blockwise", 48),
    ("float8_e4m3fn_rowwise", None),
    ("float8_e4m3fn_blockwise", 32),
    ("float8_e4m3fn_blockwise", 48),
]
SHAPE = (160, 96)  # [out, in]


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    layouts.register_with_kitchen()


def heavy_tailed(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Gaussian rows with a few large outliers and uneven row scales (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g).add(0.1)
    w[torch.rand(shape, generator=g) < 0.01] *= 12.0
    return w


def quantized(name: str, block: int | None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    fmt = layout_math.format_for(name, block)
    w = heavy_tailed(SHAPE, seed)
    codes, scale = formats.quantize(w, fmt)
    return w, codes, scale, fmt


def weight_f64(codes: torch.Tensor, scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``codes * scale`` in float64, scale expanded by explicit index arithmetic."""
    out_f, in_f = codes.shape
    if fmt.scaling is Scaling.ROW:
        return codes.double() * scale.double()
    b = fmt.block_size
    rows = torch.arange(out_f) // b
    cols = torch.arange(in_f) // b
    return codes.double() * scale.double()[rows][:, cols]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("name", "block"), CASES)
def test_dequantize_matches_quant_core_bit_for_bit(name: str, block: int | None) -> None:
    _, codes, scale, fmt = quantized(name, block)
    for dtype in (torch.float32, torch.bfloat16):
        got = layout_math.dequantize_weight(codes, scale, fmt, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, formats.dequantize(codes, scale, fmt, dtype))
    # and fp32 is exact against float64 (an int8/E4M3 code times an fp32 scale rounds once)
    exact = weight_f64(codes, scale, fmt)
    got = layout_math.dequantize_weight(codes, scale, fmt, torch.float32).double()
    assert float((got - exact).abs().max()) <= float(exact.abs().max()) * 2**-24


@pytest.mark.parametrize(("name", "block"), CASES)
def test_linear_matches_float64_reference(name: str, block: int | None) -> None:
    _, codes, scale, fmt = quantized(name, block, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, SHAPE[1], generator=g)
    bias = torch.randn(SHAPE[0], generator=g)
    ref = x.double() @ weight_f64(codes, scale, fmt).T + bias.double()
    got = layout_math.linear(x, codes, scale, fmt, bias, torch.float32)
    assert got.shape == (3, 7, SHAPE[0]) and got.dtype == torch.float32
    assert rel(got, ref) < 1e-6
    got_bf16 = layout_math.linear(x.bfloat16(), codes, scale, fmt, bias, torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16
    assert rel(got_bf16, ref) < 1e-2
    assert layout_math.linear_backend(x, codes, fmt) == "dequantize"


@pytest.mark.parametrize(("name", "block"), CASES)
def test_quantized_tensor_linear_paths(name: str, block: int | None) -> None:
    """F.linear under inference mode (aten.linear) and outside it (t + mm / addmm)."""
    _, codes, scale, fmt = quantized(name, block, seed=3)
    layout_name, cls = layouts.LAYOUTS[name]
    params = cls.Params(scale=scale, orig_dtype=torch.float32, orig_shape=SHAPE, block_size=block)
    qt = QuantizedTensor(codes, layout_name, params)
    assert layouts.is_pack_weight(qt)
    assert torch.equal(qt.dequantize(), formats.dequantize(codes, scale, fmt))
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(SHAPE[0], generator=g)
    ref_w = weight_f64(codes, scale, fmt)
    for x in (torch.randn(5, SHAPE[1], generator=g), torch.randn(2, 3, SHAPE[1], generator=g)):
        for b in (None, bias):
            ref = x.double() @ ref_w.T + (b.double() if b is not None else 0)
            with torch.inference_mode():
                fast = torch.nn.functional.linear(x, qt, b)
            plain = torch.nn.functional.linear(x, qt, b)  # decomposes into aten.t + mm/addmm
            assert not isinstance(fast, QuantizedTensor) and not isinstance(plain, QuantizedTensor)
            assert rel(fast, ref) < 1e-6 and rel(plain, ref) < 1e-6
    t = qt.t()
    assert t.shape == (SHAPE[1], SHAPE[0]) and t._params.transposed
    assert torch.equal(t.dequantize(), formats.dequantize(codes, scale, fmt).T)


@pytest.mark.parametrize(("name", "block"), CASES)
def test_requantize_after_patch_is_round_to_nearest(
    name: str, block: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """ComfyUI's LoRA path: dequantize, add the patch, ``requantize_from_float``."""
    _, codes, scale, fmt = quantized(name, block, seed=5)
    layout_name, cls = layouts.LAYOUTS[name]
    params = cls.Params(scale=scale, orig_dtype=torch.bfloat16, orig_shape=SHAPE, block_size=block)
    qt = QuantizedTensor(codes, layout_name, params)
    g = torch.Generator().manual_seed(6)
    patched = qt.dequantize().float() + 0.1 * torch.randn(16, SHAPE[1], generator=g).repeat(10, 1)
    with caplog.at_level(logging.INFO, logger="comfyui_quantizer.runtime"):
        # exactly what ComfyUI's MixedPrecisionOps.Linear.set_weight calls
        new = qt.requantize_from_float(
            patched, scale="recalculate", stochastic_rounding=1234, inplace_ops=True
        ).to(qt.dtype)
    assert new._layout_cls == layout_name and new.dtype == torch.bfloat16
    want_codes, want_scale = formats.quantize(patched, fmt)
    assert torch.equal(new._qdata.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(new._params.scale, want_scale)
    assert new._params.block_size == block
    assert sum("round-to-nearest" in r.message for r in caplog.records) <= 1
    sd = new.state_dict("layer.weight")
    assert set(sd) == {"layer.weight", "layer.weight_scale"}
    assert tuple(sd["layer.weight_scale"].shape) == fmt.scale_shape(SHAPE)
    # moving/casting keeps the layout and the numbers
    moved = new.to(torch.float32).clone()
    assert torch.equal(moved.dequantize(), formats.dequantize(want_codes, want_scale, fmt))


def test_format_for_and_check_layer_reject_bad_layers() -> None:
    with pytest.raises(ValueError, match="group_size"):
        layout_math.format_for("int8_blockwise", None)
    with pytest.raises(ValueError, match="not a pack-only format"):
        layout_math.format_for("int8_tensorwise", None)
    fmt = layout_math.format_for("float8_e4m3fn_blockwise", 48)
    codes, scale = formats.quantize(heavy_tailed(SHAPE, 7), fmt)
    layout_math.check_layer(codes, scale, fmt)
    with pytest.raises(ValueError, match=r"weight_scale of shape \[4, 2\]"):
        layout_math.check_layer(codes, scale[:, :1], fmt)
    with pytest.raises(ValueError, match="codes"):
        layout_math.check_layer(codes.view(torch.int8), scale, fmt)
    assert Format(Kind.INT8, Scaling.BLOCK, 48).name == "int8_blockwise"


def test_comfyui_already_knowing_a_format_keeps_its_own() -> None:
    theirs = {"int8_blockwise": {"comfy_tensor_layout": "SomeComfyInt8BlockLayout"}}
    assert comfy_runtime.formats_to_register(theirs) == (
        ["float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise"],
        ["int8_blockwise"],
    )
    # names an earlier import of the pack registered stay ours (importing twice is harmless)
    ours = {"int8_blockwise": {"comfy_tensor_layout": layout_math.LAYOUT_NAMES["int8_blockwise"]}}
    assert comfy_runtime.formats_to_register(ours) == (list(layout_math.PACK_FORMATS), [])


def test_unsupported_comfyui_degrades_to_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    old_ops, old_quant_ops = types.ModuleType("comfy.ops"), types.ModuleType("comfy.quant_ops")
    old_quant_ops.QUANT_ALGOS = {"float8_e4m3fn": {}}
    old_quant_ops._CK_AVAILABLE = True
    old_quant_ops.register_layout_class = lambda name, cls: None
    with caplog.at_level(logging.INFO, logger="comfyui_quantizer.runtime"):
        status = comfy_runtime.register(old_ops, old_quant_ops)
    assert not status.ok and status.registered == ()
    assert "_load_quantized_module" in status.unsupported
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "int8_blockwise" in caplog.records[0].message
    assert old_quant_ops.QUANT_ALGOS == {"float8_e4m3fn": {}}  # nothing half-registered


def test_pack_import_outside_comfyui_loads_no_runtime() -> None:
    code = (
        "import sys, comfyui_quantizer; "
        "print(sorted(m for m in sys.modules if 'comfy_kitchen' in m or 'comfy_runtime' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "block"), [("int8_blockwise", 128)])
def test_cuda_linear_within_activation_quantization_error(name: str, block: int) -> None:
    fmt = layout_math.format_for(name, block)
    w = torch.randn(512, 1024, device="cuda")
    codes, scale = formats.quantize(w, fmt)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ formats.dequantize(codes, scale, fmt).double().T
    got = layout_math.linear(x, codes, scale, fmt, None, torch.bfloat16)
    assert rel(got, ref) < 2e-2
