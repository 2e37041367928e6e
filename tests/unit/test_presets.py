"""The rules table and its precedence, as a pure function of a header (no tensor data).

``decide_all`` takes names, dtypes and shapes; these tests build headers in memory and check
the tier order documented in ``quant_core/presets.py``, the shape checks, ``--fallback``,
``--heur``, dtype overrides and option validation.
"""

from __future__ import annotations

import re

import pytest

from comfyui_quantizer.quant_core import ConfigError, QuantConfig, TensorInfo
from comfyui_quantizer.quant_core.detect import SIGNATURES
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling
from comfyui_quantizer.quant_core.layer_config import parse_layer_config
from comfyui_quantizer.quant_core.presets import PRESET_BY_NAME, PRESETS, SELECTABLE
from comfyui_quantizer.quant_core.rules import (
    Decision,
    Decisions,
    RuleOptions,
    Tier,
    decide_all,
    heuristic_problem,
    shape_problem,
)

FP8 = Format(Kind.FP8, Scaling.TENSOR)
INT8_ROW = Format(Kind.INT8, Scaling.ROW)


# What makes a T5 a T5-XXL for ComfyUI (detect_te_model): block 23's gated feed-forward width.
XXL_KEY = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"
XXL_FF = (10240, 16)


def header(**shapes: tuple[int, ...]) -> dict[str, TensorInfo]:
    """``header(a__weight=(32, 32))`` -> ``{"a.weight": TensorInfo("a.weight", "BF16", ...)}``."""
    out = {}
    for name, shape in shapes.items():
        key = name.replace("__", ".")
        out[key] = TensorInfo(key, "BF16", shape)
    return out


# A Flux.1 dev header: enough keys for detection, plus layers to exercise every tier.
FLUX = {
    **header(
        img_in__weight=(32, 64),
        txt_in__weight=(32, 64),
        guidance_in__in_layer__weight=(32, 64),
        final_layer__linear__weight=(64, 32),
        double_blocks__0__img_attn__qkv__weight=(96, 32),
        double_blocks__0__img_attn__proj__weight=(32, 32),
        double_blocks__0__img_mlp__0__weight=(128, 32),
        double_blocks__0__img_mlp__2__weight=(32, 128),
        double_blocks__0__img_attn__norm__key_norm__scale=(8,),
        single_blocks__0__linear1__weight=(224, 32),
        single_blocks__0__linear2__weight=(32, 160),
        single_blocks__0__odd__weight=(40, 24),
        single_blocks__0__square__weight=(128, 128),
    ),
}


def decide(infos: dict[str, TensorInfo] = FLUX, **config: object) -> Decisions:
    return decide_all("test", infos, QuantConfig(**config))  # type: ignore[arg-type]


def d(decisions: Decisions, key: str) -> Decision:
    return decisions.by_key[key]


def rules(**options: object) -> RuleOptions:
    return RuleOptions(**options)  # type: ignore[arg-type]


def layer_config(*rule_list: dict[str, object], **top: object) -> object:
    return parse_layer_config({"rules": list(rule_list), **top}, origin="lc.json")


# --- the table itself -------------------------------------------------------------------


def test_every_detected_family_has_an_existing_preset_and_every_preset_a_flag() -> None:
    for sig in SIGNATURES:
        assert sig.preset in PRESET_BY_NAME, sig.arch
        assert all(p in PRESET_BY_NAME for p in sig.also_fits), sig.arch
    for p in PRESETS:
        if p.selectable and p.name != "base":
            assert p.flags, p.name
    flags = [f for p in PRESETS for f in p.flags]
    assert len(flags) == len(set(flags))
    # The reference tool's flags all exist (users type them from its README).
    for flag in ("--distillation_large", "--nerf_large", "--t5xxl", "--hunyuan", "--wan",
                 "--qwen", "--zimage", "--zimage_refiner", "--flux2", "--ltxv2", "--anima",
                 "--krea2", "--mistral"):  # fmt: skip
        assert flag in flags


def test_base_rules_apply_to_fp8_and_int8_alike() -> None:
    """The reference tool forgets its base list for FP8/INT8; here norms and embeddings stay
    whatever the format (a 2-D "norm" linear and an embedding table are the hard cases)."""
    infos = header(
        blocks__0__norm_out__linear__weight=(64, 32),  # adaLN "norm" linear (Qwen's norm_out)
        tok__token_embedding__weight=(128, 32),
        blocks__0__fc__weight=(64, 32),
    )
    for config in ({}, {"kind": "int8", "scaling": "row"}, {"kind": "int8", "scaling": "block",
                                                            "block_size": 16}):  # fmt: skip
        ds = decide(infos, **config)
        assert d(ds, "blocks.0.norm_out.linear.weight").tier is Tier.PROTECT
        assert d(ds, "tok.token_embedding.weight").tier is Tier.PROTECT
        assert d(ds, "blocks.0.fc.weight").fmt is not None


# --- precedence ---------------------------------------------------------------------------


def test_layer_config_beats_custom_beats_exclude_beats_preset_keep() -> None:
    qkv, proj = "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight"
    final = "final_layer.linear.weight"
    # Preset keep alone.
    assert d(decide(), final).tier is Tier.PRESET
    # --exclude-layers beats the primary format.
    ds = decide(rules=rules(exclude_layers=r"img_attn"))
    assert d(ds, qkv).tier is Tier.EXCLUDE and d(ds, qkv).fmt is None
    # --custom-layers beats --exclude-layers, and beats the preset keep of final_layer.
    ds = decide(
        rules=rules(exclude_layers="img_attn", custom_layers="img_attn|final", custom_type="int8")
    )
    assert d(ds, qkv).fmt == Format(Kind.INT8, Scaling.TENSOR)
    assert d(ds, qkv).tier is Tier.CUSTOM and d(ds, final).tier is Tier.CUSTOM
    # A layer-config rule beats --custom-layers.
    lc = layer_config({"pattern": "qkv", "skip": True})
    ds = decide(rules=rules(layer_config=lc, custom_layers="img_attn", custom_type="int8"))
    assert d(ds, qkv).fmt is None and d(ds, qkv).tier is Tier.LAYER_CONFIG
    assert "rules[0]" in d(ds, qkv).reason
    assert d(ds, proj).tier is Tier.CUSTOM


def test_first_matching_layer_config_rule_wins_in_file_order() -> None:
    lc = layer_config(
        {"pattern": "double_blocks", "format": "int8", "scaling": "row"},
        {"pattern": r"double_blocks\.0\.img_attn\.qkv", "skip": True},  # more specific, later
    )
    ds = decide(rules=rules(layer_config=lc))
    assert d(ds, "double_blocks.0.img_attn.qkv.weight").fmt == INT8_ROW


def test_protected_keys_cannot_be_quantized_by_any_rule() -> None:
    lc = layer_config({"pattern": "img_in|key_norm", "format": "fp8"})
    ds = decide(rules=rules(layer_config=lc, custom_layers="txt_in", custom_type="int8"))
    # img_in/txt_in: the loader reads their shapes; no user rule overrides that.
    assert d(ds, "img_in.weight").fmt is None and d(ds, "img_in.weight").tier is Tier.PROTECT
    assert d(ds, "txt_in.weight").fmt is None
    notes = " ".join(ds.notes)
    assert "rules[0]" in notes and "--custom-layers" in notes and "anyway" in notes


def test_drop_beats_structure() -> None:
    """T5's decoder norms are 1-D (structure would keep them) but must leave the file."""
    infos = header(
        encoder__block__0__layer__0__SelfAttention__q__weight=(16, 16),
        encoder__block__23__layer__1__DenseReluDense__wi_1__weight=XXL_FF,
        decoder__final_layer_norm__weight=(16,),
        decoder__block__0__layer__0__SelfAttention__q__weight=(16, 16),
    )
    ds = decide(infos)
    assert d(ds, "decoder.final_layer_norm.weight").drop
    assert d(ds, "decoder.block.0.layer.0.SelfAttention.q.weight").drop


def test_layer_config_default_and_inheritance() -> None:
    lc = layer_config(
        {"pattern": "img_mlp", "format": "fp8"},  # scaling inherited from _default: row
        {"pattern": "linear1", "format": "int8", "rounding": "learned"},
        _default={"format": "fp8", "scaling": "row", "rounding": "nearest"},
    )
    ds = decide(kind="int8", scaling="block", block_size=16, rules=rules(layer_config=lc))
    assert d(ds, "double_blocks.0.img_mlp.0.weight").fmt == Format(Kind.FP8, Scaling.ROW)
    linear1 = d(ds, "single_blocks.0.linear1.weight")
    assert linear1.fmt == Format(Kind.INT8, Scaling.ROW) and linear1.rounding == "learned"
    # Layers no rule matches get _default, not the command line's int8/block16.
    assert d(ds, "double_blocks.0.img_attn.proj.weight").fmt == Format(Kind.FP8, Scaling.ROW)
    skip_all = layer_config({"pattern": "qkv", "format": "fp8"}, _default={"skip": True})
    ds = decide(rules=rules(layer_config=skip_all))
    assert d(ds, "double_blocks.0.img_attn.qkv.weight").fmt == FP8
    assert d(ds, "double_blocks.0.img_attn.proj.weight").fmt is None


def test_fullmatch_versus_search() -> None:
    lc = layer_config({"pattern": "img_attn", "format": "int8", "scaling": "row"})
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert d(decide(rules=rules(layer_config=lc)), qkv).fmt == INT8_ROW
    assert d(decide(rules=rules(layer_config=lc, fullmatch=True)), qkv).fmt == FP8
    full = layer_config({"pattern": r"double_blocks\.0\.img_attn\.qkv", "format": "int8"})
    assert d(decide(rules=rules(layer_config=full, fullmatch=True)), qkv).fmt is not None


# --- shapes, fallback, heur -------------------------------------------------------------


def test_shape_problem_and_weight_only_fallback() -> None:
    b128 = Format(Kind.INT8, Scaling.BLOCK, 128)
    # Blocks that do not tile the weight get a padded scale grid: not a problem.
    assert shape_problem(b128, (256, 160)) is None
    assert "multiple of 16" in (shape_problem(FP8, (40, 24)) or "")
    ds = decide(kind="int8", scaling="block", block_size=64)
    assert d(ds, "single_blocks.0.linear1.weight").fmt == Format(Kind.INT8, Scaling.BLOCK, 64)
    # 40x24 fits no 8-bit matmul: kept, and the note says what --fallback would do.
    odd = d(ds, "single_blocks.0.odd.weight")
    assert odd.fmt is None and "not a multiple of 16" in odd.reason
    assert any("--fallback" in n for n in ds.notes)
    ds = decide(kind="int8", scaling="block", block_size=64, rules=rules(fallback="int8"))
    odd = d(ds, "single_blocks.0.odd.weight")
    assert odd.fmt == INT8_ROW and odd.weight_only and "--fallback int8/row" in odd.reason
    assert not d(ds, "single_blocks.0.linear1.weight").weight_only
    assert any("1 layer(s) the 8-bit matmul cannot take" in n for n in ds.notes)
    fp8 = d(decide(rules=rules(fallback="fp8")), "single_blocks.0.odd.weight")
    assert fp8.fmt == FP8 and fp8.weight_only


def test_heur_keeps_tiny_and_thin_layers_with_the_reason() -> None:
    assert heuristic_problem((256, 256)) is None
    assert "too few" in (heuristic_problem((64, 64)) or "")
    assert "aspect ratio 32:1" in (heuristic_problem((4096, 128)) or "")
    infos = header(
        blocks__0__wide__weight=(512, 512),
        blocks__0__tiny__weight=(64, 64),
        blocks__0__thin__weight=(64, 4096),
    )
    plain = decide(infos)
    assert all(d(plain, k).fmt is not None for k in infos)
    ds = decide(infos, rules=rules(heur=True))
    assert d(ds, "blocks.0.wide.weight").fmt is not None
    assert d(ds, "blocks.0.tiny.weight").tier is Tier.HEUR
    assert d(ds, "blocks.0.thin.weight").reason.startswith("--heur: aspect ratio 64:1")


def test_explicit_preset_applies_only_to_parts_of_its_role() -> None:
    """--t5xxl on a full checkpoint changes the text encoder, not the diffusion model."""
    infos = {
        **{f"model.diffusion_model.{k}": TensorInfo(f"model.diffusion_model.{k}", v.dtype, v.shape)
           for k, v in FLUX.items()},
        **{f"text_encoders.t5xxl.transformer.{k}": TensorInfo(
            f"text_encoders.t5xxl.transformer.{k}", "BF16", (16, 16))
           for k in ("encoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight")},
        **{f"text_encoders.t5xxl.transformer.{k}": TensorInfo(
            f"text_encoders.t5xxl.transformer.{k}", "BF16", XXL_FF) for k in (XXL_KEY,)},
    }  # fmt: skip
    ds = decide(infos, rules=rules(preset="t5xxl"))
    assert ds.presets == {
        "model.diffusion_model.": "flux1",
        "text_encoders.t5xxl.transformer.": "t5xxl",
    }
    assert d(ds, "text_encoders.t5xxl.transformer.lm_head.weight").drop
    assert not any("does not fit" in n for n in ds.notes)
    # Two text encoders and a diffusion-model preset: nothing to apply it to, and it says so.
    two_te = {
        f"text_encoders.{te}.transformer.{k}": TensorInfo(
            f"text_encoders.{te}.transformer.{k}", "BF16", (16, 16))
        for te, k in (("t5xxl", "encoder.block.0.layer.0.SelfAttention.q.weight"),
                      ("llama", "model.layers.0.self_attn.q_proj.weight"))
    } | {f"text_encoders.t5xxl.transformer.{XXL_KEY}": TensorInfo(
        f"text_encoders.t5xxl.transformer.{XXL_KEY}", "BF16", XXL_FF)}  # fmt: skip
    ds = decide(two_te, rules=rules(preset="wan"))
    assert any("'wan' (diffusion) matches no part of this file" in n for n in ds.notes)
    assert set(ds.presets.values()) == {"t5xxl", "base"}


# --- dtype overrides ----------------------------------------------------------------------


def test_dtype_override_keeps_source_dtype_only_where_the_loader_reads_it() -> None:
    infos = {
        "encoder.block.0.layer.0.SelfAttention.q.weight": TensorInfo(
            "encoder.block.0.layer.0.SelfAttention.q.weight", "F32", (16, 16)
        ),
        "encoder.final_layer_norm.weight": TensorInfo(
            "encoder.final_layer_norm.weight", "F32", (16,)
        ),
        "encoder.block.0.layer.0.layer_norm.weight": TensorInfo(
            "encoder.block.0.layer.0.layer_norm.weight", "F32", (16,)
        ),
        XXL_KEY: TensorInfo(XXL_KEY, "F32", XXL_FF),
    }
    ds = decide(infos, output_dtype="bf16")
    assert d(ds, "encoder.final_layer_norm.weight").keep_dtype == "F32"
    assert d(ds, "encoder.block.0.layer.0.layer_norm.weight").keep_dtype is None


# --- option validation: errors before any work ------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "flux3"}, "unknown preset 'flux3'"),
        ({"preset": "vae"}, "unknown preset 'vae'"),  # chosen by detection only
        ({"custom_layers": "attn"}, "must be given together"),
        ({"custom_type": "fp8"}, "must be given together"),
        ({"custom_layers": "(", "custom_type": "fp8"}, "--custom-layers: invalid regular"),
        ({"exclude_layers": "[a-"}, "--exclude-layers: invalid regular"),
        ({"custom_layers": "a", "custom_type": "nvfp4"}, "'nvfp4' cannot be written"),
        ({"custom_layers": "a", "custom_type": "fp16"}, "unknown format 'fp16'"),
        ({"custom_layers": "a", "custom_type": "float8_e4m3fn", "custom_scaling": "row"},
         "cannot use scaling 'row'"),
        ({"custom_layers": "a", "custom_type": "int8", "custom_scaling": "row",
          "custom_block_size": 64}, "--custom-type: block_size only applies to block scaling"),
        ({"custom_scaling": "row"}, "need --custom-type"),
        ({"fallback": "mxfp8"}, "'mxfp8' cannot be written"),
        ({"fallback": "int8_blockwise"}, "per-tensor or per-row"),
    ],
)  # fmt: skip
def test_invalid_options_fail_with_a_message(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RuleOptions(**options)  # type: ignore[arg-type]


def test_block_size_without_block_scaling_fails_when_the_scaling_is_inherited() -> None:
    custom = rules(custom_layers="qkv", custom_type="int8", custom_block_size=64)
    with pytest.raises(ConfigError, match="--custom-type: block_size 64 needs block scaling"):
        decide(rules=custom)  # primary is fp8 per tensor
    ds = decide(kind="int8", scaling="block", block_size=32, rules=custom)
    assert d(ds, "double_blocks.0.img_mlp.0.weight").fmt == Format(Kind.INT8, Scaling.BLOCK, 32)
    assert d(ds, "double_blocks.0.img_attn.qkv.weight").fmt == Format(Kind.INT8, Scaling.BLOCK, 64)


def test_selectable_presets_exclude_the_detection_only_ones() -> None:
    assert "vae" not in SELECTABLE and "clip" not in SELECTABLE
    assert {"flux1", "t5xxl", "wan", "zimage_refiner", "mistral", "base"} <= set(SELECTABLE)
