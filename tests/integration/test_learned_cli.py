"""Learned rounding end to end: calibration file -> CLI -> checkpoint, plan == file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from comfyui_quantizer.cli import main
from comfyui_quantizer.quant_core import QuantConfig, SafetensorsSource, formats, plan_model
from comfyui_quantizer.quant_core.calibration import CalibrationRecorder
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling
from comfyui_quantizer.quant_core.learned import LearnedOptions

from ..conftest import tiny_transformer

LINEARS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
           "head"]  # fmt: skip


def _module(weights: dict[str, torch.Tensor]) -> nn.Module:
    """Modules named like the checkpoint's layers, holding its weights (float32)."""
    root = nn.Module()
    for name in LINEARS:
        w = weights[name + ".weight"].float()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=name + ".bias" in weights)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(weights[name + ".bias"].float())
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, lin)
    return root


def _record(weights: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    """Feed each linear correlated inputs with a mean, as a model's activations would be."""
    mod = _module(weights)
    g = torch.Generator().manual_seed(0)
    with CalibrationRecorder(mod) as rec, torch.no_grad():
        for _ in range(4):
            for name in LINEARS:
                lin = mod.get_submodule(name)
                d = lin.in_features
                mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
                lin(torch.randn(64, 4, generator=g) @ torch.randn(4, d, generator=g) * 2
                    + torch.randn(64, d, generator=g) @ mix + 0.7)  # fmt: skip
    tensors = rec.tensors()
    if prefix:
        from safetensors.torch import save_file

        save_file({prefix + k: v for k, v in tensors.items()}, str(path),
                  metadata={"format": "comfyui_quantizer.calibration", "version": "1"})  # fmt: skip
    else:
        rec.save(path)
    return path


@pytest.fixture
def model_and_calibration(tmp_path: Path, write_model) -> tuple[Path, Path, dict]:
    weights = tiny_transformer()
    model = write_model(weights)
    return model, _record(weights, tmp_path / "cal.safetensors"), weights


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter


def test_calibration_makes_learned_the_default_and_the_plan_describes_the_file(
    model_and_calibration, tmp_path: Path, capsys
) -> None:
    model, cal, weights = model_and_calibration
    out = tmp_path / "out.safetensors"
    report = tmp_path / "report.json"
    rc = main(["-i", str(model), "-o", str(out), "--calibration", str(cal), "--report",
               str(report), "--no-progress"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "learned rounding:" in text
    written = _read(out)
    # every layer has statistics: biases corrected, FP8 input scales from the recorded inputs
    assert "blocks.0.attn.qkv.input_scale" in written
    assert float(written["blocks.0.attn.qkv.input_scale"]) > 0
    assert not torch.equal(written["blocks.0.attn.qkv.bias"], weights["blocks.0.attn.qkv.bias"])
    assert written["blocks.0.attn.qkv.bias"].dtype == weights["blocks.0.attn.qkv.bias"].dtype
    # the plan (what --dry-run prints) lists exactly what was written, dtype and shape
    config = QuantConfig(rounding="learned", calibration=str(cal))
    with SafetensorsSource(model) as src:
        plan = plan_model(src, config)
    assert {t.name: (t.dtype, t.shape) for t in plan.outputs} == {
        k: (_st(v.dtype), tuple(v.shape)) for k, v in written.items()
    }
    assert not any(e.key.endswith(".bias") and e.action.value == "keep" for e in plan.entries
                   if e.key[: -len(".bias")] in LINEARS)  # fmt: skip
    layers = {r["name"]: r for r in json.loads(report.read_text())["layers"]}
    qkv = layers["blocks.0.attn.qkv"]
    assert qkv["extra"]["kept"] in ("learned", "nearest")
    assert qkv["extra"]["guard_on"] == "held-out rows"
    assert qkv["output_sqnr_db"] >= qkv["extra"]["rtn_output_sqnr_db"]


def _st(dtype: torch.dtype) -> str:
    from comfyui_quantizer.quant_core import dtypes

    return dtypes.to_safetensors(dtype)


def test_learned_beats_round_to_nearest_on_output_error(model_and_calibration, tmp_path) -> None:
    model, cal, _ = model_and_calibration
    out = tmp_path / "int8.safetensors"
    report = tmp_path / "r.json"
    args = ["-i", str(model), "-o", str(out), "--calibration", str(cal), "--int8",
            "--scaling-mode", "row", "--report", str(report), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    layers = [r for r in json.loads(report.read_text())["layers"] if r["name"] in LINEARS]
    gains = [r["output_sqnr_db"] - r["extra"]["rtn_output_sqnr_db"] for r in layers]
    assert min(gains) >= 0 and sum(gains) / len(gains) > 1.0
    assert all(r["extra"]["guard_margin_db"] is not None for r in layers)


def test_simple_forces_round_to_nearest_codes(model_and_calibration, tmp_path: Path) -> None:
    model, cal, weights = model_and_calibration
    out = tmp_path / "rtn.safetensors"
    args = ["-i", str(model), "-o", str(out), "--calibration", str(cal), "--simple", "--int8",
            "--scaling-mode", "row", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    written = _read(out)
    fmt = Format(Kind.INT8, Scaling.ROW)
    for name in LINEARS:
        codes, scale = formats.quantize(weights[name + ".weight"], fmt)
        assert torch.equal(written[name + ".weight"], codes)
        assert torch.equal(written[name + ".weight_scale"], scale)


def test_prefixed_checkpoint_keys_find_their_statistics(tmp_path: Path, write_model) -> None:
    weights = tiny_transformer()
    model = write_model({"model.diffusion_model." + k: v for k, v in weights.items()})
    cal = _record(weights, tmp_path / "cal.safetensors")
    config = QuantConfig(rounding="learned", calibration=str(cal))
    with SafetensorsSource(model) as src:
        plan = plan_model(src, config)
    matched = {e.key: e.calibration for e in plan.entries if e.calibration}
    assert matched["model.diffusion_model.head.weight"] == "head.weight"
    assert len(matched) == len(LINEARS)


def test_output_objective_without_calibration_is_a_one_line_error(tiny_model, capsys) -> None:
    assert main(["-i", str(tiny_model), "--learned", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs calibration statistics" in err[0]


def test_data_free_objective_without_statistics_keeps_round_to_nearest(
    tiny_model, tmp_path: Path
) -> None:
    out = tmp_path / "svd.safetensors"
    report = tmp_path / "r.json"
    args = ["-i", str(tiny_model), "-o", str(out), "--learned", "--objective", "svd", "--min_k",
            "4", "--num_iter", "8", "--report", str(report), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    layers = [r for r in json.loads(report.read_text())["layers"] if r["action"] == "quantize"]
    assert layers and all(r["extra"]["kept"] == "nearest" for r in layers)
    assert all(r["extra"]["guard_on"] == "weight error (no statistics)" for r in layers)


def test_learned_options_reach_the_config(model_and_calibration) -> None:
    from comfyui_quantizer.cli import build_parser, config_from_args

    model, cal, _ = model_and_calibration
    args = build_parser().parse_args(["-i", str(model), "--calibration", str(cal),
        "--optimizer", "radam", "--lr_schedule", "plateau", "--lr_patience", "3",
        "--lr_factor", "0.3", "--lr_cooldown", "2", "--lr_min", "1e-5", "--lr_threshold",
        "0.01", "--num_iter", "7", "--lr", "0.2", "--early_stop", "4", "--top_p", "0.5",
        "--min_k", "2", "--max_k", "9", "--no-bias-correction"])  # fmt: skip
    config = config_from_args(args)
    assert config.rounding == "learned" and config.calibration == str(cal)
    assert config.learned == LearnedOptions(optimizer="radam", schedule="plateau",
        lr_patience=3, lr_factor=0.3, lr_cooldown=2, lr_min=1e-5, lr_threshold=0.01,
        num_iter=7, lr=0.2, early_stop=4, top_p=0.5, min_k=2, max_k=9,
        bias_correction=False)  # fmt: skip


def test_layer_config_asks_for_learned_on_one_layer(model_and_calibration, tmp_path: Path) -> None:
    model, cal, _ = model_and_calibration
    config = tmp_path / "layers.json"
    rule = {"pattern": r"mlp\.fc2", "format": "int8", "scaling": "row", "rounding": "learned"}
    config.write_text(json.dumps({"_default": {"format": "int8", "scaling": "row"},
                                  "rules": [rule]}))  # fmt: skip
    for extra, kept in (([], None), (["--calibration", str(cal), "--simple"], "learned")):
        report = tmp_path / "r.json"
        args = ["-i", str(model), "-o", str(tmp_path / "o.safetensors"), "--overwrite",
                "--layer-config", str(config), "--report", str(report), "--no-progress",
                *extra]  # fmt: skip
        assert main(args) == 0
        layers = {r["name"]: r for r in json.loads(report.read_text())["layers"]}
        fc2 = layers["blocks.0.mlp.fc2"]
        assert fc2["rounding"] == "learned" and fc2["extra"].get("kept") == kept
        if kept is None:  # no statistics: round-to-nearest, and the report says why
            assert fc2["extra"]["learned_skipped"] == "no calibration statistics for this layer"
            assert any("round-to-nearest where learned was asked" in n
                       for n in json.loads(report.read_text())["notes"])  # fmt: skip
        assert "kept" not in layers["blocks.0.mlp.fc1"]["extra"]


def test_learned_layers_report_progress_inside_and_cancel_there(
    model_and_calibration, tmp_path: Path
) -> None:
    from comfyui_quantizer.quant_core import Cancelled, quantize_model

    model, cal, _ = model_and_calibration
    config = QuantConfig(kind="int8", scaling="row", rounding="learned", calibration=str(cal))
    events = []
    with SafetensorsSource(model) as src:
        quantize_model(src, config, tmp_path / "ok.safetensors", progress=events.append)
    inside = [e for e in events if e.layer is None]
    # every learned layer reports from inside (error feedback blocks, search checkpoints)
    assert {e.current for e in inside} == set(LINEARS)
    assert all(0.0 < e.fraction <= 1.0 for e in inside)
    positions = [e.position for e in events]
    assert positions == sorted(positions) and positions[-1] == events[-1].total

    # Cancel asked from inside the first learned layer stops there: no entry finishes after it.
    seen = []
    with SafetensorsSource(model) as src, pytest.raises(Cancelled):
        quantize_model(src, config, tmp_path / "cancelled.safetensors", progress=seen.append,
                       cancel=lambda: any(e.layer is None for e in seen))  # fmt: skip
    first_inside = next(i for i, e in enumerate(seen) if e.layer is None)
    assert all(e.layer is None for e in seen[first_inside:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.safetensors", "model.safetensors",
                                                          "ok.safetensors"]  # fmt: skip
