"""Legacy scaled_fp8 checkpoints: refused for re-quantization, upgraded losslessly on request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_quantizer.cli import main

P = "model.diffusion_model."


def legacy_state(marker_elements: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    w1 = torch.randn(32, 16, generator=g)
    w2 = torch.randn(16, 32, generator=g)
    s1, s2 = w1.abs().max() / 448, w2.abs().max() / 448
    return {
        f"{P}scaled_fp8": torch.zeros(marker_elements, dtype=torch.float8_e4m3fn),
        f"{P}a.weight": (w1 / s1).to(torch.float8_e4m3fn),
        f"{P}a.scale_weight": s1.reshape(1),
        f"{P}a.scale_input": torch.tensor(1.0),  # "not calibrated": ComfyUI drops it
        f"{P}a.bias": torch.randn(32, generator=g).to(torch.bfloat16),
        f"{P}b.weight": (w2 / s2).to(torch.float8_e4m3fn),
        f"{P}b.scale_weight": s2.reshape(()),
        f"{P}b.scale_input": torch.tensor(0.25),
        f"{P}norm.weight": torch.ones(16, dtype=torch.bfloat16),
    }


def test_legacy_file_is_refused_without_the_flag(write_model, tmp_path: Path, capsys) -> None:
    src = write_model(legacy_state(), name="legacy.safetensors")
    assert main(["-i", str(src), "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "already quantized" in err and "legacy scaled_fp8" in err and "--upgrade-legacy" in err


@pytest.mark.parametrize("marker_elements", [0, 2])
def test_upgrade_is_lossless(write_model, tmp_path: Path, marker_elements: int) -> None:
    state = legacy_state(marker_elements)
    src = write_model(state, name="legacy.safetensors")
    out = tmp_path / "new.safetensors"
    assert main(["-i", str(src), "-o", str(out), "--upgrade-legacy", "--no-progress"]) == 0
    new = load_file(str(out))
    expected = {"format": "float8_e4m3fn"} | (
        {"full_precision_matrix_mult": True} if marker_elements == 2 else {}
    )
    for layer in ("a", "b"):
        k = P + layer
        assert torch.equal(
            new[f"{k}.weight"].view(torch.uint8), state[f"{k}.weight"].view(torch.uint8)
        )
        assert (
            new[f"{k}.weight_scale"].shape == () and new[f"{k}.weight_scale"].dtype == torch.float32
        )
        assert new[f"{k}.weight_scale"].item() == state[f"{k}.scale_weight"].item()
        assert json.loads(bytes(new[f"{k}.comfy_quant"].tolist())) == expected
    assert f"{P}a.input_scale" not in new  # 1.0 means "not calibrated"
    assert new[f"{P}b.input_scale"].item() == 0.25
    assert f"{P}scaled_fp8" not in new and not any(
        k.endswith((".scale_weight", ".scale_input")) for k in new
    )
    assert torch.equal(new[f"{P}a.bias"], state[f"{P}a.bias"])
    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    assert layers == {P + "a": expected, P + "b": expected}
