"""Files the CLI writes: exactly ComfyUI's layout (DESIGN.md §2), untouched kept tensors, report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_quantizer.cli import main
from comfyui_quantizer.quant_core import formats
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

QUANTIZED = [
    "blocks.0.attn.qkv",
    "blocks.0.attn.proj",
    "blocks.0.mlp.fc1",
    "blocks.0.mlp.fc2",
    "head",
]


def header_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def decode(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode("utf-8"))


CASES = {
    "fp8-tensor": ([], Format(Kind.FP8, Scaling.TENSOR), "F8_E4M3"),
    "int8-tensor": (["--int8"], Format(Kind.INT8, Scaling.TENSOR), "I8"),
    "int8-row": (["--int8", "--scaling-mode", "row"], Format(Kind.INT8, Scaling.ROW), "I8"),
    "int8-block": (["--int8", "--scaling_mode", "block", "--block_size", "32"],
                   Format(Kind.INT8, Scaling.BLOCK, 32), "I8"),
    "fp8-row": (["--scaling-mode", "row"], Format(Kind.FP8, Scaling.ROW), "F8_E4M3"),
    "fp8-block": (["--scaling-mode", "block", "--block_size", "48"],
                  Format(Kind.FP8, Scaling.BLOCK, 48), "F8_E4M3"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_layout_of_every_quantized_layer(
    tiny_model: Path, tmp_path: Path, case: str, capsys
) -> None:
    flags, fmt, dtype = CASES[case]
    out = tmp_path / "out.safetensors"
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "-i",
                str(tiny_model),
                "-o",
                str(out),
                "--report",
                str(report),
                "--no-progress",
                *flags,
            ]
        )
        == 0
    )
    source = load_file(str(tiny_model))
    written = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118

    expected_keys = set()
    for layer in QUANTIZED:
        w = source[f"{layer}.weight"]
        assert dtypes[f"{layer}.weight"] == dtype and written[f"{layer}.weight"].shape == w.shape
        scale = written[f"{layer}.weight_scale"]
        assert dtypes[f"{layer}.weight_scale"] == "F32"
        assert tuple(scale.shape) == fmt.scale_shape(tuple(w.shape))
        assert dtypes[f"{layer}.comfy_quant"] == "U8"
        assert decode(written[f"{layer}.comfy_quant"]) == fmt.comfy_quant()
        # The codes decode to the original within the format's error: independent float64 check.
        w_hat = written[f"{layer}.weight"].double() * formats.expand_scale(
            scale.double(), tuple(w.shape), fmt
        )
        rel = float((w_hat - w.double()).norm() / w.double().norm())
        assert 0 < rel < (0.04 if fmt.kind is Kind.FP8 else 0.03)
        expected_keys |= {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.comfy_quant"}

    # Every other tensor is copied bit for bit, in its own dtype.
    kept = set(source) - {f"{layer}.weight" for layer in QUANTIZED}
    for key in kept:
        assert written[key].dtype == source[key].dtype
        assert torch.equal(written[key].view(torch.uint8), source[key].view(torch.uint8)), key
    assert set(written) == expected_keys | kept

    # Header: original metadata kept; _quantization_metadata agrees with the tensors.
    meta = header_of(out)
    assert meta["modelspec.title"] == "tiny" and meta["note"] == "ünïcode"
    qmeta = json.loads(meta["_quantization_metadata"])
    assert qmeta["format_version"] == "1.0"
    assert qmeta["layers"] == {
        layer: decode(written[f"{layer}.comfy_quant"]) for layer in QUANTIZED
    }
    assert json.loads(meta["comfyui_quantizer"])["requires_pack"] is (not fmt.stock_loadable)

    # The report lists every layer with a weight SQNR equal to a float64 recomputation.
    rep = json.loads(report.read_text())
    by_name = {r["name"]: r for r in rep["layers"]}
    for layer in QUANTIZED:
        w = source[f"{layer}.weight"].double()
        w_hat = formats.dequantize(
            written[f"{layer}.weight"], written[f"{layer}.weight_scale"], fmt
        ).double()
        db = 10 * math.log10(float((w * w).sum() / ((w - w_hat) ** 2).sum()))
        assert by_name[layer]["weight_sqnr_db"] == pytest.approx(db, abs=1e-3)
        assert by_name[layer]["bytes_after"] < by_name[layer]["bytes_before"]
    assert rep["stock_loadable"] is fmt.stock_loadable
    captured = capsys.readouterr()
    err, out_text = captured.err, captured.out
    assert ("NEEDS the comfyui-quantizer pack" in err) is (not fmt.stock_loadable)
    assert ("NEEDS the comfyui-quantizer pack" in out_text) is (not fmt.stock_loadable)


def test_output_dtype_casts_only_kept_float_tensors(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    assert (
        main(["-i", str(tiny_model), "-o", str(out), "--output-dtype", "fp16", "--no-progress"])
        == 0
    )
    written, source = load_file(str(out)), load_file(str(tiny_model))
    assert written["blocks.0.norm1.weight"].dtype == torch.float16
    assert torch.equal(written["blocks.0.attn.qkv.bias"], source["blocks.0.attn.qkv.bias"].half())
    assert torch.equal(written["step"], source["step"])  # not a float: untouched
    assert written["head.weight"].dtype == torch.float8_e4m3fn


def test_default_output_name_and_overwrite(tiny_model: Path) -> None:
    expected = tiny_model.with_name("model_int8_row.safetensors")
    assert main(["-i", str(tiny_model), "--int8", "--scaling-mode", "row", "--no-progress"]) == 0
    assert expected.exists()
    first = expected.read_bytes()
    assert main(["-i", str(tiny_model), "--int8", "--scaling-mode", "row", "--no-progress"]) == 1
    assert (
        main(
            [
                "-i",
                str(tiny_model),
                "--int8",
                "--scaling-mode",
                "row",
                "--no-progress",
                "--overwrite",
            ]
        )
        == 0
    )
    assert expected.read_bytes() == first  # deterministic


def test_console_script_runs(tiny_model: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("comfy-quantize")
    out = tmp_path / "x.safetensors"
    done = subprocess.run(
        [str(exe), "-i", str(tiny_model), "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "5 layers quantized" in done.stdout and "loads in stock ComfyUI" in done.stdout
    assert out.exists()
