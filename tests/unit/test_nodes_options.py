"""The Quantize node's widgets -> QuantConfig, without ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_quantizer.nodes.options import (
    FORMATS,
    PACK_ONLY_MARK,
    PRESETS,
    QuantizeWidgets,
    config_from_widgets,
)
from comfyui_quantizer.quant_core import ConfigError, Format, Kind, LearnedOptions, Scaling
from comfyui_quantizer.quant_core.presets import SELECTABLE


def test_stock_loadable_formats_come_first_and_pack_only_ones_are_marked() -> None:
    stock = []
    for label, (kind, scaling) in FORMATS.items():
        fmt = Format(kind, scaling, 128 if scaling is Scaling.BLOCK else None)
        assert (PACK_ONLY_MARK in label) == (not fmt.stock_loadable), label
        stock.append(fmt.stock_loadable)
    assert stock == sorted(stock, reverse=True), "a pack-only format is listed before a stock one"
    assert stock.count(True) == 3  # fp8 tensor, int8 row, int8 tensor
    # Every (kind, scaling) pair is offered exactly once.
    assert len(set(FORMATS.values())) == len(FORMATS) == len(Kind) * len(Scaling)


@pytest.mark.parametrize("label", list(FORMATS))
def test_each_format_choice_gives_its_format(label: str) -> None:
    config = config_from_widgets(
        QuantizeWidgets(format=label, block_size=64),
        from_graph_object=False,
        compute_device="cpu",
    )
    kind, scaling = FORMATS[label]
    assert (config.kind, config.scaling) == (kind, scaling)
    assert config.format.block_size == (64 if scaling is Scaling.BLOCK else None)
    assert config.format.stock_loadable == (PACK_ONLY_MARK not in label)


def test_default_is_fp8_per_tensor_which_stock_comfyui_loads() -> None:
    config = config_from_widgets(QuantizeWidgets(), from_graph_object=False, compute_device="cpu")
    assert config.format == Format(Kind.FP8, Scaling.TENSOR)
    assert config.format.stock_loadable


@pytest.mark.parametrize(
    ("keep", "graph_object", "expected"),
    [
        ("auto", False, None),  # a file: unquantized tensors keep their stored dtype
        ("auto", True, "bf16"),  # a MODEL/CLIP: ComfyUI may hold them upcast to fp32
        ("keep", True, None),
        ("fp16", False, "fp16"),
        ("fp32", True, "fp32"),
    ],
)
def test_keep_dtype(keep: str, graph_object: bool, expected: str | None) -> None:
    config = config_from_widgets(
        QuantizeWidgets(keep_dtype=keep), from_graph_object=graph_object, compute_device="cpu"
    )
    assert config.output_dtype == expected


def test_device_auto_follows_comfyui_and_cpu_forces_cpu() -> None:
    auto = config_from_widgets(
        QuantizeWidgets(device="auto"), from_graph_object=False, compute_device="cuda:1"
    )
    assert auto.device == "cuda:1"
    forced = config_from_widgets(
        QuantizeWidgets(device="cpu"), from_graph_object=False, compute_device="cuda:1"
    )
    assert forced.device == "cpu"


@pytest.mark.parametrize(
    ("widgets", "names"),
    [
        (QuantizeWidgets(format="fp4 tensor"), "format"),
        (QuantizeWidgets(rounding="stochastic"), "rounding"),
        (QuantizeWidgets(keep_dtype="int4"), "keep_dtype"),
        (QuantizeWidgets(device="tpu"), "device"),
        (QuantizeWidgets(format="int8 block [needs pack]", block_size=0), "block size"),
    ],
)
def test_bad_widget_values_raise_config_error_naming_the_widget(
    widgets: QuantizeWidgets, names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        config_from_widgets(widgets, from_graph_object=False, compute_device="cpu")


def test_learned_widgets_become_learned_options_and_calibration(tmp_path: Path) -> None:
    widgets = QuantizeWidgets(
        rounding="learned", objective="output", optimizer="adamw", lr_schedule="plateau",
        lr=0.05, iterations=7, lr_gamma=0.9, lr_patience=3, lr_factor=0.25, lr_min=1e-3,
        calibration=str(tmp_path / "calibration.safetensors"),
    )  # fmt: skip
    config = config_from_widgets(widgets, from_graph_object=False, compute_device="cpu")
    learned = config.learned
    assert config.rounding == "learned"
    assert (learned.objective, learned.optimizer, learned.schedule) == (
        "output",
        "adamw",
        "plateau",
    )
    assert (learned.lr, learned.num_iter, learned.lr_gamma) == (0.05, 7, 0.9)
    assert (learned.lr_patience, learned.lr_factor, learned.lr_min) == (3, 0.25, 1e-3)
    assert config.calibration == str(tmp_path / "calibration.safetensors")
    # Knobs without a widget keep quant_core's defaults.
    assert learned.error_feedback == LearnedOptions().error_feedback
    assert learned.early_stop == LearnedOptions().early_stop


def test_defaults_are_quant_cores_measured_defaults() -> None:
    config = config_from_widgets(QuantizeWidgets(), from_graph_object=False, compute_device="cpu")
    assert config.learned == LearnedOptions()
    assert config.rounding == "nearest" and config.calibration is None


def test_learned_output_objective_without_calibration_says_what_to_connect() -> None:
    with pytest.raises(ConfigError, match="connect a 'Calibrate for Learned Rounding' node"):
        config_from_widgets(
            QuantizeWidgets(rounding="learned"), from_graph_object=False, compute_device="cpu"
        )
    svd = config_from_widgets(
        QuantizeWidgets(rounding="learned", objective="svd"),
        from_graph_object=False,
        compute_device="cpu",
    )
    assert svd.learned.objective == "svd" and svd.calibration is None


@pytest.mark.parametrize(
    ("widgets", "message"),
    [
        (QuantizeWidgets(optimizer="sgd"), "optimizer"),
        (QuantizeWidgets(lr_schedule="cosine"), "schedule"),
        (QuantizeWidgets(lr=0.0), "lr"),
        (QuantizeWidgets(lr_factor=2.0), "lr_factor"),
        (QuantizeWidgets(iterations=-1), "num_iter"),
    ],
)
def test_bad_learned_widgets_are_config_errors(widgets: QuantizeWidgets, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_widgets(widgets, from_graph_object=False, compute_device="cpu")


def test_preset_auto_comes_first_and_every_preset_is_offered() -> None:
    assert PRESETS[0] == "auto"
    assert set(PRESETS[1:]) == set(SELECTABLE)
    for name in PRESETS:
        config = config_from_widgets(
            QuantizeWidgets(preset=name), from_graph_object=False, compute_device="cpu"
        )
        assert config.rules.preset == name


def test_layer_config_text_becomes_the_rules_layer_config() -> None:
    rules = [
        {"pattern": "mlp", "format": "int8", "scaling": "row"},
        {"pattern": "head", "skip": True},
    ]
    text = json.dumps({"rules": rules})
    config = config_from_widgets(
        QuantizeWidgets(layer_config=text), from_graph_object=False, compute_device="cpu"
    )
    layer_config = config.rules.layer_config
    assert layer_config is not None
    assert layer_config.first_match("blocks.0.mlp.fc1").skip is False
    assert layer_config.first_match("head").skip is True
    assert layer_config.first_match("blocks.0.attn.qkv") is None
    blank = config_from_widgets(
        QuantizeWidgets(layer_config="  \n"), from_graph_object=False, compute_device="cpu"
    )
    assert blank.rules.layer_config is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "layer_config: not valid JSON"),
        ('{"rules": [{"format": "fp8"}]}', "rules\\[0\\]"),
        ('{"rules": [{"pattern": "x", "format": "nvfp4"}]}', "nvfp4"),
        ('["a list"]', "must be a JSON object"),
    ],
)
def test_a_bad_layer_config_is_a_config_error_saying_where(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_widgets(
            QuantizeWidgets(layer_config=text), from_graph_object=False, compute_device="cpu"
        )


def test_an_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="preset"):
        config_from_widgets(
            QuantizeWidgets(preset="sdxl"), from_graph_object=False, compute_device="cpu"
        )


def test_cpu_threads_are_passed_through() -> None:
    config = config_from_widgets(
        QuantizeWidgets(), from_graph_object=False, compute_device="cpu", cpu_threads=3
    )
    assert config.cpu_threads == 3
    with pytest.raises(ConfigError, match="cpu threads"):
        config_from_widgets(
            QuantizeWidgets(), from_graph_object=False, compute_device="cpu", cpu_threads=0
        )
