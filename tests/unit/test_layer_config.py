"""Layer-config JSON: schema validation (errors name the rule) and templates that round-trip."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from comfyui_quantizer.quant_core import ConfigError, QuantConfig, SafetensorsSource
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling
from comfyui_quantizer.quant_core.layer_config import (
    family_pattern,
    load_layer_config,
    parse_layer_config,
)
from comfyui_quantizer.quant_core.plan import Action, build_plan
from comfyui_quantizer.quant_core.rules import RuleOptions, layer_config_template


def test_a_valid_config_parses_in_order() -> None:
    lc = parse_layer_config(
        {
            "_comment": ["free", "text"],
            "fullmatch": False,
            "_default": {"format": "int8", "scaling": "row", "rounding": "learned"},
            "rules": [
                {"pattern": "final", "skip": True, "_comment": "why"},
                {"pattern": "attn", "format": "int8_blockwise", "block_size": 64},
                {"pattern": "mlp", "format": "float8_e4m3fn_rowwise"},
                {"pattern": "proj", "format": "int8_tensorwise", "scaling": "row"},
            ],
        },
        origin="x.json",
    )
    assert [r.pattern for r in lc.rules] == ["final", "attn", "mlp", "proj"]
    assert lc.rules[0].skip
    fp8 = Format(Kind.FP8, Scaling.TENSOR)
    assert lc.rules[1].spec is not None and lc.rules[1].spec.resolve(fp8) == Format(
        Kind.INT8, Scaling.BLOCK, 64
    )
    assert lc.rules[2].spec is not None
    assert lc.rules[2].spec.resolve(fp8) == Format(Kind.FP8, Scaling.ROW)
    assert lc.rules[3].spec is not None
    assert lc.rules[3].spec.resolve(fp8) == Format(Kind.INT8, Scaling.ROW)
    assert lc.default is not None and lc.default.rounding == "learned"
    assert lc.first_match("blocks.0.attn.mlp") is lc.rules[1]  # order, not specificity


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"rulez": []}, "unknown key 'rulez'"),
        ({"rules": {}}, "'rules' must be a list"),
        ({"rules": ["attn"]}, "rules[0]: must be an object"),
        ({"rules": [{"format": "fp8"}]}, "rules[0]: needs a non-empty 'pattern'"),
        ({"rules": [{"pattern": "ok", "format": "fp8"}, {"pattern": "attn(", "format": "fp8"}]},
         "rules[1] (pattern 'attn('): invalid regular expression"),
        ({"rules": [{"pattern": "attn", "format": "fp4x"}]},
         "rules[0] (pattern 'attn'): unknown format 'fp4x'"),
        ({"rules": [{"pattern": "attn", "format": "nvfp4"}]},
         "rules[0] (pattern 'attn'): format 'nvfp4' cannot be written"),
        ({"rules": [{"pattern": "attn", "format": "fp8", "scale": "row"}]},
         "rules[0] (pattern 'attn'): unknown key 'scale'"),
        ({"rules": [{"pattern": "attn"}]}, "rules[0] (pattern 'attn'): needs 'format'"),
        ({"rules": [{"pattern": "attn", "skip": True, "format": "fp8"}]},
         "a 'skip' rule cannot also set 'format'"),
        ({"rules": [{"pattern": "attn", "skip": "yes"}]}, "'skip' must be true or false"),
        ({"rules": [{"pattern": "attn", "format": "fp8", "scaling": "column"}]},
         "unknown scaling 'column'"),
        ({"rules": [{"pattern": "attn", "format": "float8_e4m3fn", "scaling": "block"}]},
         "format 'float8_e4m3fn' cannot use scaling 'block'"),
        ({"rules": [{"pattern": "attn", "format": "fp8", "scaling": "row", "block_size": 64}]},
         "block_size only applies to block scaling"),
        ({"rules": [{"pattern": "a", "format": "int8_blockwise", "block_size": 0}]},
         "block_size must be between 1 and 4096"),
        ({"rules": [{"pattern": "attn", "format": "fp8", "rounding": "stochastic"}]},
         "unknown rounding 'stochastic'"),
        ({"_default": {"pattern": "x", "format": "fp8"}}, "_default: _default takes no 'pattern'"),
        ({"_default": {"format": "mxfp8"}}, "_default: format 'mxfp8' cannot be written"),
        ({"fullmatch": "yes"}, "'fullmatch' must be true or false"),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_rule(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_layer_config(data, origin="my.json")
    assert str(e.value).startswith("layer config my.json")


def test_load_reports_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": [', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_layer_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_layer_config(tmp_path / "missing.json")


def test_family_pattern_folds_block_indices() -> None:
    pattern = family_pattern("double_blocks.7.img_attn.qkv")
    assert pattern == r"^double_blocks\.\d+\.img_attn\.qkv$"
    assert re.search(pattern, "double_blocks.12.img_attn.qkv")
    assert not re.search(pattern, "double_blocks.12.img_attn.qkv_extra")
    # Only the block index folds: mlp.0 and mlp.2 are different layers of one block.
    mlp = family_pattern("double_blocks.7.img_mlp.0")
    assert re.search(mlp, "double_blocks.3.img_mlp.0")
    assert not re.search(mlp, "double_blocks.3.img_mlp.2")


@pytest.fixture
def template_for(
    write_model: Callable[..., Path], tiny_archs: ModuleType
) -> Callable[..., tuple[Path, dict[str, object]]]:
    def _make(name: str, **config: object) -> tuple[Path, dict[str, object]]:
        path = write_model(tiny_archs.BUILDERS[name](), name=f"{name}.safetensors")
        with SafetensorsSource(path) as src:
            tpl = layer_config_template(src.name, src.tensors(), QuantConfig(**config))  # type: ignore[arg-type]
        return path, tpl

    return _make


def _decisions(path: Path, config: QuantConfig) -> dict[str, tuple[str, str | None, str]]:
    with SafetensorsSource(path) as src:
        plan = build_plan(src, config)
    return {
        e.key: (e.action.value, e.fmt.label if e.fmt else None, e.rounding) for e in plan.entries
    }


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("flux1-dev", {}),
        ("qwen-image", {"kind": "int8", "scaling": "row"}),
        ("ltxv2", {"kind": "int8", "scaling": "block", "block_size": 32}),
        ("t5-xxl", {}),
    ],
)
def test_template_unchanged_reproduces_the_plan(
    template_for: Callable[..., tuple[Path, dict[str, object]]],
    name: str,
    config: dict[str, object],
) -> None:
    path, tpl = template_for(name, **config)
    lc = parse_layer_config(json.loads(json.dumps(tpl)), origin="template")  # valid JSON schema
    base = QuantConfig(**config)  # type: ignore[arg-type]
    with_template = QuantConfig(**config, rules=RuleOptions(layer_config=lc))  # type: ignore[arg-type]
    assert _decisions(path, with_template) == _decisions(path, base)
    # One rule per family (plus exact rules for exceptions): far fewer rules than layers.
    rules = tpl["rules"]
    assert isinstance(rules, list)
    patterns = [r["pattern"] for r in rules]
    assert len(patterns) == len(set(patterns))
    weights = [k for k in _decisions(path, base) if k.endswith(".weight")]
    assert len(rules) < len(weights)
    assert all(isinstance(r["_comment"], str) and r["_comment"] for r in rules)


def test_template_puts_exceptions_before_their_family(
    template_for: Callable[..., tuple[Path, dict[str, object]]],
) -> None:
    """Qwen-Image keeps block 0's img_mod but quantizes the same layer in other blocks."""
    _, tpl = template_for("qwen-image")
    rules = tpl["rules"]
    assert isinstance(rules, list)
    patterns = [r["pattern"] for r in rules]
    exact = r"^transformer_blocks\.0\.img_mod\.1$"
    family = r"^transformer_blocks\.\d+\.img_mod\.1$"
    assert patterns.index(exact) < patterns.index(family)
    assert rules[patterns.index(exact)]["skip"] is True
    assert rules[patterns.index(family)]["format"] == "fp8"
    # Protected keys (the loader reads img_in's shape) are not offered at all.
    assert not any("img_in" in p for p in patterns)


def test_edited_template_changes_only_what_was_edited(
    template_for: Callable[..., tuple[Path, dict[str, object]]],
) -> None:
    path, tpl = template_for("flux1-dev")
    rules = tpl["rules"]
    assert isinstance(rules, list)
    for rule in rules:
        if rule["pattern"] == r"^double_blocks\.\d+\.img_mlp\.0$":
            rule.update({"format": "int8", "scaling": "row"})
    lc = parse_layer_config(tpl, origin="edited")
    after = _decisions(path, QuantConfig(rules=RuleOptions(layer_config=lc)))
    before = _decisions(path, QuantConfig())
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"double_blocks.0.img_mlp.0.weight", "double_blocks.1.img_mlp.0.weight"}
    assert after["double_blocks.0.img_mlp.0.weight"] == (
        Action.QUANTIZE.value,
        "int8/row",
        "nearest",
    )
