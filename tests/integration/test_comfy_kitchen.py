"""Stock-format layers dequantize through comfy-kitchen (what ComfyUI uses) to our exact values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_quantizer.cli import main
from comfyui_quantizer.quant_core import formats
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

ck_tensor = pytest.importorskip("comfy_kitchen.tensor", reason="comfy-kitchen is a dev dependency")

STOCK = {
    "fp8": ([], Format(Kind.FP8, Scaling.TENSOR), "TensorCoreFP8Layout"),
    "int8-tensor": (["--int8"], Format(Kind.INT8, Scaling.TENSOR), "TensorWiseINT8Layout"),
    "int8-row": (
        ["--int8", "--scaling-mode", "row"],
        Format(Kind.INT8, Scaling.ROW),
        "TensorWiseINT8Layout",
    ),
}


@pytest.mark.parametrize("case", list(STOCK))
def test_comfy_kitchen_dequantizes_to_our_values(
    tiny_model: Path, tmp_path: Path, case: str
) -> None:
    flags, fmt, layout = STOCK[case]
    out = tmp_path / "q.safetensors"
    assert main(["-i", str(tiny_model), "-o", str(out), "--no-progress", *flags]) == 0
    sd = load_file(str(out))
    layers = [k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")]
    assert len(layers) == 5
    layout_cls = ck_tensor.get_layout_class(layout)
    for layer in layers:
        conf = json.loads(bytes(sd[f"{layer}.comfy_quant"].tolist()))
        assert conf["format"] == fmt.name
        codes, scale = sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"]
        # Build the tensor the way ComfyUI's loader does (orig_dtype = the compute dtype).
        params = layout_cls.Params(
            scale=scale, orig_dtype=torch.float32, orig_shape=tuple(codes.shape)
        )
        qt = ck_tensor.QuantizedTensor(codes, layout, params)
        theirs = qt.dequantize()
        ours = formats.dequantize(codes, scale, fmt, torch.float32)
        assert theirs.dtype == torch.float32 and torch.equal(theirs, ours), layer
        # In bf16 ComfyUI rounds the scale to bf16 first (FP8); stay within one bf16 step.
        bf = ck_tensor.QuantizedTensor(
            codes,
            layout,
            layout_cls.Params(
                scale=scale, orig_dtype=torch.bfloat16, orig_shape=tuple(codes.shape)
            ),
        ).dequantize()
        assert torch.allclose(bf.float(), ours, rtol=2**-7, atol=0)
