"""``comfy-quantize --dry-run``: the plan it prints is what the conversion writes, layer by layer.

The written file is read back with the safetensors library (an independent reader); the dry
run is shown to read no tensor data (a file full of NaN plans fine) and to write nothing but
the report it was asked for. Invalid options fail before any work and leave no file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open

from comfyui_quantizer.cli import main
from comfyui_quantizer.quant_core import QuantConfig, SafetensorsSource, dry_run
from comfyui_quantizer.quant_core.rules import layer_config_template

CODE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8}


@pytest.fixture
def model(write_model: Callable[..., Path], tiny_archs: ModuleType) -> Callable[[str], Path]:
    def _file(name: str) -> Path:
        tensors = tiny_archs.BUILDERS[name]()
        if name == "t5-xxl":  # a layer no 8-bit matmul takes (24 is not a multiple of 16)
            odd = torch.randn(40, 24, generator=torch.Generator().manual_seed(1)) * 0.05
            tensors["encoder.block.1.layer.0.SelfAttention.extra.weight"] = odd.bfloat16()
        return write_model(tensors, name=f"{name}.safetensors")

    return _file


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def expected_scale_shape(scaling: str, shape: list[int]) -> list[int]:
    """Scale shape from the layer's label (``fp8/tensor``, ``int8/row``, ``int8/block64``)."""
    mode = scaling.split("/")[1]
    if mode == "tensor":
        return []
    if mode == "row":
        return [shape[0], 1]
    block = int(mode.removeprefix("block"))
    return [math.ceil(shape[0] / block), math.ceil(shape[1] / block)]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        # A full checkpoint: quantized model and T5, CLIP and VAE kept, kept floats cast to fp16.
        ("flux-checkpoint", ["--output-dtype", "fp16"]),
        # T5 with its decoder (dropped), INT8 blocks, a weight-only fallback for an odd shape.
        ("t5-xxl", ["--int8", "--scaling-mode", "block", "--block_size", "32", "--fallback",
                    "int8"]),
        # Tiers: a layer config, custom layers, exclusions and --heur together.
        ("flux1-dev", ["--layer-config", "LC", "--custom-layers", r"single_blocks\.1",
                       "--custom-type", "int8", "--custom-scaling-mode", "row",
                       "--exclude-layers", "txt_mlp", "--heur"]),
    ],
)  # fmt: skip
def test_dry_run_plan_equals_what_the_conversion_writes(
    model: Callable[[str], Path], tmp_path: Path, name: str, options: list[str]
) -> None:
    src = model(name)
    lc = tmp_path / "lc.json"
    lc.write_text(
        json.dumps(
            {
                "rules": [
                    {"pattern": r"double_blocks\.0\.img_attn\.qkv", "skip": True},
                    {"pattern": "img_mlp", "format": "int8_blockwise", "block_size": 32},
                ]
            }
        ),
        encoding="utf-8",
    )
    options = [str(lc) if o == "LC" else o for o in options]
    out = tmp_path / "out.safetensors"
    plan_json, real_json = tmp_path / "plan.json", tmp_path / "real.json"

    before = set(tmp_path.iterdir())
    assert run_cli("-i", src, "-o", out, "--dry-run", "--report", plan_json, *options) == 0
    assert set(tmp_path.iterdir()) - before == {plan_json}  # only the report was written
    assert run_cli("-i", src, "-o", out, "--report", real_json, "--no-progress", *options) == 0

    plan = json.loads(plan_json.read_text())
    real = json.loads(real_json.read_text())
    assert plan["dry_run"] and not real["dry_run"]
    fields = ("name", "action", "format", "scaling", "rounding", "shape", "dtype",
              "bytes_before", "bytes_after", "reason")  # fmt: skip
    assert [[r[f] for f in fields] for r in plan["layers"]] == [
        [r[f] for f in fields] for r in real["layers"]
    ]
    assert plan["architecture"] == real["architecture"]
    assert plan["stock_loadable"] == real["stock_loadable"]

    # The file, read by safetensors itself, holds exactly what each plan entry says.
    with SafetensorsSource(src) as source:
        source_keys = list(source.tensors())
    with safe_open(out, framework="pt") as f:
        written = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
        comfy_quant = {
            k: json.loads(bytes(f.get_tensor(k).tolist()).decode())
            for k in f.keys()  # noqa: SIM118
            if k.endswith(".comfy_quant")
        }
    expected: set[str] = set()
    actions = set()
    for key, layer in zip(source_keys, plan["layers"], strict=True):
        actions.add(layer["action"])
        if layer["action"] == "drop":
            continue
        if layer["action"] == "keep":
            expected.add(key)
            t = written[key]
            numel = math.prod(t.get_shape())
            assert t.get_shape() == layer["shape"]
            assert numel * _itemsize(t.get_dtype()) == layer["bytes_after"], key
            continue
        assert layer["action"] == "quantize"
        base = layer["name"]
        names = {base + ".weight", base + ".weight_scale", base + ".comfy_quant"}
        expected |= names
        weight, scale = written[base + ".weight"], written[base + ".weight_scale"]
        kind = "float8_e4m3fn" if layer["scaling"].startswith("fp8") else "int8"
        assert weight.get_dtype() == {"float8_e4m3fn": "F8_E4M3", "int8": "I8"}[kind]
        assert weight.get_shape() == layer["shape"]
        assert scale.get_dtype() == "F32"
        assert scale.get_shape() == expected_scale_shape(layer["scaling"], layer["shape"])
        settings = comfy_quant[base + ".comfy_quant"]
        assert settings["format"] == layer["format"]
        weight_only = "weight-only" in layer["reason"]
        assert settings.get("full_precision_matrix_mult", False) is weight_only
        if "block" in layer["scaling"]:
            assert settings["group_size"] == int(layer["scaling"].split("block")[1])
        nbytes = sum(
            math.prod(written[n].get_shape()) * _itemsize(written[n].get_dtype()) for n in names
        )
        assert nbytes == layer["bytes_after"]
    assert set(written) == expected
    assert out.stat().st_size == plan["file_bytes"]  # the predicted size is exact
    assert "quantize" in actions and "keep" in actions
    if name == "t5-xxl":
        assert "drop" in actions
        extra = next(r for r in plan["layers"] if r["name"].endswith("SelfAttention.extra"))
        assert extra["action"] == "quantize" and extra["scaling"] == "int8/row"


def _itemsize(dtype: str) -> int:
    return {"F8_E4M3": 1, "I8": 1, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}[dtype]


def test_dry_run_reads_only_the_header(model: Callable[[str], Path], tmp_path: Path) -> None:
    """Every data byte set to 0xff (NaN in bf16): the dry run plans it; converting fails."""
    src = model("flux1-dev")
    raw = bytearray(src.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    raw[header_end:] = b"\xff" * (len(raw) - header_end)
    src.write_bytes(bytes(raw))
    out = tmp_path / "out.safetensors"
    before = set(tmp_path.iterdir())
    assert run_cli("-i", src, "-o", out, "--dry-run") == 0
    assert set(tmp_path.iterdir()) == before
    assert run_cli("-i", src, "-o", out, "--no-progress") == 1  # real reads find the NaNs
    assert not out.exists()


def test_dry_run_and_template_read_no_tensor(model: Callable[[str], Path]) -> None:
    """Counted: planning, the dry-run report and the template call ``read`` zero times."""

    class CountingSource(SafetensorsSource):
        reads = 0

        def read(self, key: str) -> torch.Tensor:
            CountingSource.reads += 1
            return super().read(key)

    with CountingSource(model("flux-checkpoint")) as src:
        report = dry_run(src, QuantConfig(output_dtype="fp16"))
        layer_config_template(src.name, src.tensors(), QuantConfig())
        assert report.file_bytes is not None and report.file_bytes > 0
        assert CountingSource.reads == 0
        src.read("vae.decoder.conv_out.weight")  # the counter does count
    assert CountingSource.reads == 1


def test_dry_run_prints_the_plan_summary(
    model: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = model("flux1-dev")
    assert run_cli("-i", src, "-o", tmp_path / "o.safetensors", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "architecture: flux1-dev" in text
    assert "predicted file size: " in text and " bytes (" in text
    assert "dry run: result loads in stock ComfyUI" in text
    # Per layer: format, rounding, sizes, or the reason it stays.
    assert "double_blocks.0.img_attn.qkv" in text and "fp8/tensor" in text and "nearest" in text
    assert "keep: preset flux1: the loader reads this key's shape" in text
    assert run_cli("-i", src, "-o", tmp_path / "o.safetensors", "--dry-run", "--int8",
                   "--scaling-mode", "block", "--block_size", "32") == 0  # fmt: skip
    assert "NEEDS the comfyui-quantizer pack" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"pattern": "img", "format": "fp8"}, {"pattern": "attn(", "format": "fp8"}],
         "rules[1] (pattern 'attn('): invalid regular expression"),
        ([{"pattern": "attn", "format": "nvfp4"}], "rules[0] (pattern 'attn'): format 'nvfp4'"),
        ([{"pattern": "attn", "format": "fp8", "bits": 8}],
         "rules[0] (pattern 'attn'): unknown key 'bits'"),
    ],
)  # fmt: skip
def test_invalid_layer_config_fails_before_any_work(
    model: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rules: list[dict[str, object]],
    message: str,
) -> None:
    src = model("flux1-dev")
    lc = tmp_path / "bad.json"
    lc.write_text(json.dumps({"rules": rules}), encoding="utf-8")
    out = tmp_path / "out.safetensors"
    before = set(tmp_path.iterdir())
    assert run_cli("-i", src, "-o", out, "--layer-config", lc, "--no-progress") == 1
    err = capsys.readouterr().err
    assert message in err and str(lc) in err
    assert set(tmp_path.iterdir()) == before  # no output, no temporary file


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--custom-layers", "attn", "--custom-type", "nvfp4"], "'nvfp4' cannot be written"),
        (["--fallback", "mxfp8"], "'mxfp8' cannot be written"),
        (["--wan", "--t5xxl"], "choose one preset"),
        (["--preset", "sdxl"], "unknown preset 'sdxl'"),
    ],
)
def test_bad_options_fail_before_any_work(
    model: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    message: str,
) -> None:
    src = model("flux1-dev")
    before = set(tmp_path.iterdir())
    assert run_cli("-i", src, "-o", tmp_path / "out.safetensors", *options) == 1
    assert message in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before


def test_layer_config_template_from_the_cli(model: Callable[[str], Path], tmp_path: Path) -> None:
    src = model("flux1-dev")
    template, out = tmp_path / "template.json", tmp_path / "out.safetensors"
    assert run_cli("-i", src, "-o", out, "--layer-config-template", template) == 0
    assert not out.exists()  # a template request is a dry run
    data = json.loads(template.read_text())
    assert any("flux1-dev" in line for line in data["_comment"])
    # Feeding it back gives the same plan.
    plans = []
    for extra in ([], ["--layer-config", str(template)]):
        report = tmp_path / f"r{len(plans)}.json"
        assert run_cli("-i", src, "-o", out, "--dry-run", "--report", report, *extra) == 0
        layers = json.loads(report.read_text())["layers"]
        plans.append([(r["name"], r["action"], r["scaling"], r["rounding"]) for r in layers])
    assert plans[0] == plans[1]


def test_help_filters_and_experimental(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help-filters"])  # no -i needed, like --version
    assert e.value.code == 0
    text = capsys.readouterr().out
    for preset in ("flux1", "distillation_large", "nerf_large", "t5xxl", "wan", "hunyuan",
                   "qwen", "zimage_refiner", "ltxv2", "anima", "krea2", "mistral"):  # fmt: skip
        assert f"\n{preset}  [" in text
    assert "dropped: keys starting decoder" in text  # what t5xxl does, in words
    with pytest.raises(SystemExit):
        main(["--help-experimental"])
    text = capsys.readouterr().out
    for fmt in ("float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise", "int8_blockwise"):
        assert any(fmt in line and "PACK-ONLY" in line for line in text.splitlines())
    assert "custom_nodes" in text
