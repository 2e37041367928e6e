"""Node logic through the public API, without ComfyUI: sources over a patched model, the temp
result, progress/cancel, and the events the web view reads.

ComfyUI's ModelPatcher cannot run in CI, so ``LoraPatcher`` below stands in for the two members
the nodes use (``model`` and ``patch_weight_to_device``); the e2e suite runs the real one.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_quantizer.nodes import events
from comfyui_quantizer.nodes.options import QuantizeWidgets, config_from_widgets
from comfyui_quantizer.nodes.result import (
    ModelType,
    QuantizedFile,
    quantize_to_temp,
    record_calibration,
)
from comfyui_quantizer.nodes.sources import ModelFile, PatcherSource, clip_source, model_source
from comfyui_quantizer.quant_core import (
    Cancelled,
    InputError,
    LayerReport,
    Progress,
    QuantConfig,
    dry_run,
)

from ..conftest import tiny_transformer


class StateModule:
    """The loaded module: only ``state_dict()`` is read."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state)


class LoraPatcher:
    """``model.state_dict()`` plus LoRA patches applied on read, like ComfyUI's ModelPatcher."""

    def __init__(self, state: dict[str, torch.Tensor], patches: dict[str, torch.Tensor]) -> None:
        self.model = StateModule(state)
        self._state = state
        self.patches = patches
        self.reads: list[str] = []

    def patch_weight_to_device(self, key: str, *, return_weight: bool) -> torch.Tensor:
        assert return_weight, "the loaded model must never be modified"
        self.reads.append(key)
        weight = self._state[key]
        if key not in self.patches:
            return weight
        return (weight.double() + self.patches[key].double()).to(weight.dtype)


class Clip:
    def __init__(self, patcher: LoraPatcher, tokenizer: dict[str, object]) -> None:
        self.patcher = patcher
        self.tokenizer = type("Tok", (), {"state_dict": lambda _self: tokenizer})()


def diffusion_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusion model as ComfyUI holds it: fp32 (upcast), under ``diffusion_model.``."""
    state = {
        f"diffusion_model.{k}": v.float() if v.is_floating_point() else v
        for k, v in tiny_transformer(seed).items()
    }
    state["model_sampling.sigmas"] = torch.linspace(1, 0, 10)
    return state


def dequantized(saved: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    return saved[f"{layer}.weight"].double() * saved[f"{layer}.weight_scale"].double()


def sqnr64(ref: torch.Tensor, got: torch.Tensor) -> float:
    err = ref.double() - got.double()
    return 10 * math.log10(float((ref.double() ** 2).sum()) / float((err**2).sum()))


def test_model_source_bakes_patches_in_and_names_keys_like_a_file(tmp_path: Path) -> None:
    state = diffusion_state()
    g = torch.Generator().manual_seed(1)
    key = "diffusion_model.blocks.0.mlp.fc1.weight"
    up, down = torch.randn(256, 4, generator=g), torch.randn(4, 64, generator=g)
    delta = (up @ down) * 0.02  # a rank-4 LoRA about as large as the weight itself
    patcher = LoraPatcher(state, {key: delta})
    source = model_source(patcher)
    assert "model_sampling.sigmas" not in source.tensors()
    assert set(source.tensors()) == {k.removeprefix("diffusion_model.") for k in state} - {
        "model_sampling.sigmas"
    }
    config = config_from_widgets(
        QuantizeWidgets(format="int8 row"), from_graph_object=True, compute_device="cpu"
    )
    result = quantize_to_temp(source, config, tmp_path, model_type=ModelType.DIFFUSION_MODEL)
    saved = load_file(str(result.path))
    baked = state[key].double() + delta.double()
    got = dequantized(saved, "blocks.0.mlp.fc1")
    assert sqnr64(baked, got) > 35  # INT8 per-row of the *patched* weight (~41 dB)
    assert sqnr64(state[key], got) < 10  # ... which is far from the unpatched one
    # Unquantized tensors of a MODEL are written as bf16 (keep_dtype "auto"), not as fp32.
    assert saved["blocks.0.norm1.weight"].dtype == torch.bfloat16
    assert saved["step"].dtype == torch.int64
    assert key in patcher.reads


def test_clip_source_takes_one_llm_or_t5_encoder_with_its_tokenizer(tmp_path: Path) -> None:
    state = {f"t5xxl.transformer.{k}": v for k, v in tiny_transformer(2).items()}
    state["t5xxl.logit_scale"] = torch.tensor(4.6)  # the wrapper's, not the encoder's
    spiece = torch.arange(20, dtype=torch.uint8)
    clip = Clip(LoraPatcher(state, {}), {"spiece_model": spiece, "not_a_tensor": "x"})
    source = clip_source(clip)
    assert "t5xxl" in source.name
    assert set(source.tensors()) == {*tiny_transformer(2), "spiece_model"}
    assert torch.equal(source.read("spiece_model"), spiece)
    assert torch.equal(source.read("head.weight"), state["t5xxl.transformer.head.weight"])


@pytest.mark.parametrize(
    ("components", "message"),
    [
        (["clip_l"], "CLIP-L/G"),
        (["clip_l", "t5xxl"], "CLIP-L/G"),
        (["clip_g"], "CLIP-L/G"),
        (["qwen3_4b", "t5xxl"], "several text encoders"),
    ],
)
def test_clip_l_g_and_combined_clips_are_refused(components: list[str], message: str) -> None:
    state = {f"{c}.transformer.{k}": v for c in components for k, v in tiny_transformer().items()}
    with pytest.raises(InputError, match=message):
        clip_source(Clip(LoraPatcher(state, {}), {}))


def test_a_source_with_nothing_under_the_prefix_is_an_input_error() -> None:
    with pytest.raises(InputError, match="holds no tensors"):
        PatcherSource(LoraPatcher({"x.weight": torch.ones(2)}, {}), name="m", prefix="nope.")


def test_result_lives_in_a_temp_file_until_dropped(tiny_model: Path, tmp_path: Path) -> None:
    seen: list[Progress] = []
    with ModelFile(tiny_model, ModelType.DIFFUSION_MODEL).open() as source:
        result = quantize_to_temp(
            source,
            QuantConfig(),
            tmp_path / "temp",
            model_type=ModelType.DIFFUSION_MODEL,
            progress=seen.append,
        )
    assert result.path.parent == tmp_path / "temp" and result.path.is_file()
    assert result.size == result.path.stat().st_size > 0
    assert [p.done for p in seen] == list(range(1, len(result.report.layers) + 1))
    assert {p.total for p in seen} == {len(result.report.layers)}
    path = result.path
    del result
    gc.collect()
    assert not path.exists(), "the temp file must go with the result object"


def test_discard_deletes_now_and_twice_is_harmless(tiny_model: Path, tmp_path: Path) -> None:
    with ModelFile(tiny_model, ModelType.DIFFUSION_MODEL).open() as source:
        result = quantize_to_temp(source, QuantConfig(), tmp_path, model_type=ModelType.CHECKPOINT)
    result.discard()
    result.discard()
    assert not result.path.exists()
    assert isinstance(result, QuantizedFile) and "checkpoints" in repr(result)


def test_cancel_mid_run_leaves_no_file(tiny_model: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def cancel_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    temp = tmp_path / "temp"
    with (
        ModelFile(tiny_model, ModelType.DIFFUSION_MODEL).open() as source,
        pytest.raises(Cancelled),
    ):
        quantize_to_temp(
            source,
            QuantConfig(kind="int8", scaling="row"),
            temp,
            model_type=ModelType.DIFFUSION_MODEL,
            cancel=cancel_after_three,
        )
    assert calls["n"] == 4
    assert list(temp.iterdir()) == []


def test_events_carry_the_table_and_summary_as_json(tiny_model: Path, tmp_path: Path) -> None:
    payloads: list[dict[str, object]] = []
    with ModelFile(tiny_model, ModelType.DIFFUSION_MODEL).open() as source:
        result = quantize_to_temp(
            source,
            QuantConfig(kind="int8", scaling="row"),
            tmp_path,
            model_type=ModelType.DIFFUSION_MODEL,
            progress=lambda p: payloads.append(events.layer_payload("7", p)),
        )
    report = result.report
    rows = [p["row"] for p in payloads if p["row"] is not None]
    assert [r["layer"] for r in rows] == [r.name for r in report.quantized]  # type: ignore[index]
    assert all(p["node"] == "7" for p in payloads)
    summary = events.summary_payload("7", report)
    assert json.loads(json.dumps(summary)) == summary  # plain JSON, no NaN/Infinity
    assert summary["rows"] == rows
    assert summary["quantized_layers"] == len(report.quantized) == 5
    assert summary["stock_loadable"] is True
    assert summary["bytes_after"] == report.bytes_after < summary["bytes_before"]  # type: ignore[operator]
    for row in rows:
        assert row["format"] == "int8/row"  # type: ignore[index]
        assert 30 < row["weight_sqnr_db"] < 60  # type: ignore[index,operator]


def test_an_exact_layer_is_sent_as_inf_not_as_invalid_json() -> None:
    layer = LayerReport("l", "quantize", "float8_e4m3fn", "fp8/tensor", "nearest", [16, 16],
                        "BF16", 512, 256, weight_sqnr_db=math.inf, time_s=0.0015)  # fmt: skip
    row = events.layer_row(layer)
    assert row == {"layer": "l", "format": "fp8/tensor", "output_sqnr_db": None,
                   "weight_sqnr_db": "inf", "time_ms": 1.5}  # fmt: skip
    json.dumps(row, allow_nan=False)


def test_runs_under_comfyuis_inference_mode_with_cpu_workers(
    write_model: Callable[..., Path], tmp_path: Path
) -> None:
    # ComfyUI executes nodes inside torch.inference_mode(); the CPU workers are threads. The
    # weight is large enough (4M elements) to be split across workers.
    g = torch.Generator().manual_seed(3)
    path = write_model({"blocks.0.fc.weight": torch.randn(2048, 2048, generator=g) * 0.02})
    config = QuantConfig(kind="int8", scaling="row", cpu_threads=2)
    with ModelFile(path, ModelType.DIFFUSION_MODEL).open() as source:
        plain = quantize_to_temp(source, config, tmp_path / "a", model_type=ModelType.CHECKPOINT)
        with torch.inference_mode():
            inside = quantize_to_temp(
                source, config, tmp_path / "b", model_type=ModelType.CHECKPOINT
            )
    assert inside.path.read_bytes() == plain.path.read_bytes()


class TinyNet(torch.nn.Module):
    """Two linears whose state dict matches ``tiny_net_state`` (as a diffusion model would)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)
        self.load_state_dict({k: v.float() for k, v in state.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def tiny_net_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "fc1.weight": torch.randn(128, 64, generator=g) / 8,
        "fc1.bias": torch.randn(128, generator=g) * 0.01,
        "fc2.weight": torch.randn(64, 128, generator=g) / 11,
        "fc2.bias": torch.randn(64, generator=g) * 0.01,
    }


def correlated_inputs(n: int, seed: int) -> torch.Tensor:
    """``n`` draws (``seed``) from one input distribution with a few strong directions (as
    real activations have), not white noise."""
    basis = torch.randn(64, 64, generator=torch.Generator().manual_seed(99))
    basis *= torch.logspace(1, -1, 64).unsqueeze(1)
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)) @ basis


def test_calibration_feeds_learned_rounding_end_to_end(
    write_model: Callable[..., Path], tmp_path: Path
) -> None:
    state = tiny_net_state()
    path = write_model(state)
    net = TinyNet(state)
    stats = record_calibration(net, lambda: net(correlated_inputs(512, 0)), tmp_path, seed=0)
    assert stats.layers == 2 and stats.path.is_file()
    assert "2 layers" in repr(stats)
    results = {}
    for rounding in ("nearest", "learned"):
        widgets = QuantizeWidgets(
            format="int8 tensor", rounding=rounding, calibration=str(stats.path)
        )
        config = config_from_widgets(widgets, from_graph_object=False, compute_device="cpu")
        with ModelFile(path, ModelType.DIFFUSION_MODEL).open() as source:
            results[rounding] = quantize_to_temp(
                source, config, tmp_path / rounding, model_type=ModelType.DIFFUSION_MODEL
            )
    learned = results["learned"].report
    assert any("learned rounding" in note for note in learned.notes), learned.notes
    # Judge on held-out inputs in float64: the learned codes must not be worse than nearest.
    x = correlated_inputs(2048, 1).double()
    errors = {}
    for rounding, result in results.items():
        saved = load_file(str(result.path))
        w = dequantized(saved, "fc1")
        errors[rounding] = float((x @ (w - state["fc1.weight"].double()).T).norm())
    print(f"held-out output error fc1: {errors}")
    assert errors["learned"] < errors["nearest"] * 0.8  # the guard measured about -8 dB
    row = events.layer_row(next(r for r in learned.quantized if r.name == "fc1"))
    assert isinstance(row["output_sqnr_db"], float)  # the live table shows output SQNR


def test_calibration_of_a_module_that_never_ran_is_an_error(tmp_path: Path) -> None:
    net = TinyNet(tiny_net_state())
    with pytest.raises(InputError, match="nothing recorded"):
        record_calibration(net, lambda: None, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_node_summary_counts_kept_tensors_as_the_report_does(write_model, tiny_archs) -> None:
    """A T5-XXL with its decoder: the preset drops the decoder, and dropped tensors are not
    'kept' in the node's summary any more than in the CLI report."""
    path = write_model(tiny_archs.BUILDERS["t5-xxl"]())
    with ModelFile(path, ModelType.TEXT_ENCODER).open() as source:
        report = dry_run(source, QuantConfig())
    dropped = sum(r.action == "drop" for r in report.layers)
    assert dropped > 0
    summary = events.summary_payload("1", report)
    assert summary["kept_tensors"] == report.to_dict()["summary"]["kept_tensors"]  # type: ignore[index]
    assert summary["kept_tensors"] == len(report.layers) - len(report.quantized) - dropped
