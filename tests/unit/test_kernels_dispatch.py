"""Backend choice: quiet fallback for automatic calls, loud errors for explicit ones, and a
pack that imports and works without Triton."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from comfyui_quantizer.quant_core import dispatch, formats
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

INT8_ROW = Format(Kind.INT8, Scaling.ROW)


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton (if installed) is imported first, under the interpreter setting the session chose:
    # imported for the first time without it, it would stay compiled-mode for the later
    # kernel tests of this process, which then skip.
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_cpu_auto_uses_torch_and_says_why(no_interpreter: None) -> None:
    w = torch.randn(64, 96)
    choice = dispatch.choose_quantize(w, INT8_ROW)
    assert choice.backend == "torch"
    assert "triton" in choice.reasons
    codes, scale = dispatch.quantize(w, INT8_ROW)
    ref_codes, ref_scale = formats.quantize(w, INT8_ROW)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_fallback_is_logged_once(no_interpreter: None, caplog: pytest.LogCaptureFixture) -> None:
    dispatch._log_once.cache_clear()
    w = torch.randn(32, 64)
    with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
        for _ in range(3):
            dispatch.quantize(w, INT8_ROW)
    lines = [r.getMessage() for r in caplog.records if "using torch" in r.getMessage()]
    assert len(lines) == 1 and "triton:" in lines[0]


def test_explicit_backend_that_cannot_run_raises_with_every_reason(no_interpreter: None) -> None:
    w = torch.randn(32, 64)
    with pytest.raises(dispatch.BackendUnavailableError) as err:
        dispatch.quantize(w, INT8_ROW, backend="triton")
    message = str(err.value)
    assert "triton:" in message and "torch: available" in message
    fmt = Format(Kind.FP8, Scaling.BLOCK, 128)
    codes, scale = formats.quantize(torch.randn(128, 128), fmt)
    with pytest.raises(dispatch.BackendUnavailableError, match="scaled_mm: needs CUDA"):
        dispatch.block_scaled_linear(torch.randn(4, 128), codes, scale, fmt, backend="scaled_mm")
    with pytest.raises(dispatch.BackendUnavailableError, match="unknown backend"):
        dispatch.quantize(w, INT8_ROW, backend="cuda-magic")


def test_unsupported_inputs_fall_back(kernel_device: torch.device) -> None:
    """With Triton usable, inputs the kernels don't take still get the reference."""
    odd_block = Format(Kind.INT8, Scaling.BLOCK, 48)
    w = torch.randn(96, 96, device=kernel_device)
    assert dispatch.choose_quantize(w, odd_block).backend == "torch"
    assert "block size 48" in dispatch.choose_quantize(w, odd_block).reasons["triton"]
    w64 = w.double()
    assert dispatch.choose_quantize(w64, INT8_ROW).backend == "torch"
    assert dispatch.choose_quantize(w.bfloat16(), INT8_ROW).backend == "triton"


def test_cublas_fp8_is_not_chosen_for_shapes_it_refuses() -> None:
    """cuBLAS's block-scaled FP8 GEMM raised CUBLAS_STATUS_NOT_SUPPORTED for M = 1 (the
    modulation layers of a DiT): the shape rule keeps it for M >= SCALED_MM_MIN_ROWS only."""
    rule = dispatch.scaled_mm_shape_problem
    min_rows = dispatch.SCALED_MM_MIN_ROWS
    assert 1 < min_rows <= 512  # a DiT's text tokens (512) still go to cuBLAS
    assert rule(4096, 3072, 3072, 128) is None
    assert rule(min_rows, 3072, 3072, 128) is None
    assert "rows" in rule(1, 18432, 3072, 128)
    assert "rows" in rule(min_rows - 1, 3072, 3072, 128)
    assert "K a multiple of 512" in rule(4096, 3072, 3200, 128)
    assert "N of 128" in rule(4096, 3000, 3072, 128)
    assert "B=128" in rule(4096, 3072, 3072, 64)


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_compiles_nothing_and_loads_no_triton() -> None:
    out = run_python(
        """
        import sys
        import comfyui_quantizer.kernels
        from comfyui_quantizer.quant_core import dispatch, quantize_model
        print("triton" in sys.modules, any("kernels.quantize" in m for m in sys.modules))
        """
    )
    assert out.split() == ["False", "False"]


def test_pack_works_without_triton() -> None:
    out = run_python(
        """
        import sys
        sys.modules["triton"] = None  # import triton now fails, as when it is not installed
        import torch
        from comfyui_quantizer.quant_core import dispatch, formats
        from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling
        fmt = Format(Kind.INT8, Scaling.BLOCK, 64)
        w = torch.randn(128, 128)
        choice = dispatch.choose_quantize(w, fmt)
        codes, scale = dispatch.quantize(w, fmt)
        ok = torch.equal(codes, formats.quantize(w, fmt)[0])
        y = dispatch.block_scaled_linear(torch.randn(3, 128), codes, scale, fmt)
        print(choice.backend, ok, tuple(y.shape), "not importable" in choice.reasons["triton"])
        """
    )
    assert out.split() == ["torch", "True", "(3,", "128)", "True"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("kind", "scaling"), [("fp8", "tensor"), ("int8", "row"), ("int8", "block")]
)
def test_pipeline_on_cuda_uses_the_kernels_and_writes_the_cpu_bytes(
    write_model, tmp_path, kind: str, scaling: str
) -> None:
    from comfyui_quantizer.quant_core import QuantConfig, SafetensorsSource, quantize_model

    g = torch.Generator().manual_seed(0)
    tensors = {
        "blocks.0.attn.qkv.weight": (torch.randn(192, 128, generator=g) * 0.05).bfloat16(),
        "blocks.0.mlp.fc1.weight": (torch.randn(320, 128, generator=g) * 0.05).bfloat16(),
    }
    path = write_model(tensors)
    outputs = {}
    for device in ("cpu", "cuda"):
        config = QuantConfig(kind=kind, scaling=scaling, block_size=64, device=device)
        out = tmp_path / f"{device}.safetensors"
        with SafetensorsSource(path) as src:
            report = quantize_model(src, config, out)
        outputs[device] = out.read_bytes()
        backends = {layer.extra.get("quantize_backend") for layer in report.layers}
        # Both weights are quantized (2-D, sides multiples of 16): on CUDA both use Triton.
        cpu_backend = "torch" if importlib.util.find_spec("numba") is None else "numba"
        assert backends == ({cpu_backend} if device == "cpu" else {"triton"})
    assert outputs["cpu"] == outputs["cuda"]
