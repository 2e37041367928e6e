"""The streaming pipeline end to end on many layers of mixed sizes: every written layer equals the
PyTorch reference quantization bit for bit, whatever the overlap of reading, math and writing
(code buffers are reused across layers; the writer lags behind by bytes, not entries)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_quantizer.quant_core import QuantConfig, SafetensorsSource, formats, quantize_model
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling


def _model() -> dict[str, torch.Tensor]:
    """Large and small linears interleaved with norms and biases, in several dtypes."""
    g = torch.Generator().manual_seed(11)
    shapes = [(384, 512), (64, 64), (512, 384), (96, 32), (512, 512), (32, 96)] * 8
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    model: dict[str, torch.Tensor] = {}
    for i, (o, n) in enumerate(shapes):
        model[f"blocks.{i}.lin.weight"] = torch.randn(o, n, generator=g).to(dtypes[i % 3])
        model[f"blocks.{i}.lin.bias"] = torch.randn(o, generator=g).to(dtypes[i % 3])
        model[f"blocks.{i}.norm.weight"] = torch.ones(n, dtype=dtypes[i % 3])
    return model


@pytest.mark.parametrize(
    "fmt",
    [Format(Kind.FP8, Scaling.TENSOR), Format(Kind.INT8, Scaling.ROW),
     Format(Kind.INT8, Scaling.BLOCK, 64)],
    ids=lambda f: f.label,
)  # fmt: skip
@pytest.mark.parametrize("threads", [1, 2])
def test_every_layer_matches_the_reference(
    write_model, tmp_path: Path, fmt: Format, threads: int
) -> None:
    model = _model()
    src = write_model(model)
    out = tmp_path / "q.safetensors"
    config = QuantConfig(
        kind=fmt.kind, scaling=fmt.scaling, block_size=fmt.block_size or 128, cpu_threads=threads
    )
    with SafetensorsSource(src) as source:
        report = quantize_model(source, config, out)
    written = load_file(str(out))
    assert sum(1 for layer in report.layers if layer.format is not None) == 48
    for key, w in model.items():
        if not key.endswith("lin.weight"):
            assert torch.equal(written[key], w), key
            continue
        codes, scale = formats.quantize(w, fmt)
        layer = key.removesuffix(".weight")
        assert torch.equal(written[f"{layer}.weight_scale"], scale), key
        assert torch.equal(written[key].view(torch.uint8), codes.view(torch.uint8)), key


def test_the_report_says_when_the_cpu_path_lacked_numba(
    write_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comfyui_quantizer.quant_core import dispatch

    src = write_model(_model())
    with SafetensorsSource(src) as source:
        fast = quantize_model(source, QuantConfig(), tmp_path / "a.safetensors")
        monkeypatch.setattr(dispatch, "_numba_failure", "numba is not importable (test)")
        slow = quantize_model(source, QuantConfig(), tmp_path / "b.safetensors")
    if {layer.extra.get("quantize_backend") for layer in fast.layers} == {None, "numba"}:
        assert not any("numba" in n for n in fast.notes)
    note = next(n for n in slow.notes if "PyTorch path" in n)
    assert "numba is not importable (test)" in note and "pip install numba" in note
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
