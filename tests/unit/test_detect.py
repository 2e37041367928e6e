"""Architecture detection and the planned decision for a few keys of each model family.

Every file is a tiny safetensors model with the real key names (``tests/tiny_archs.py``). For
each key we say why it must stay (the loader reads its shape, it is a norm, an embedding, a
modulation shared by all blocks, ...) or why quantizing it is the point (a bulk linear).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from comfyui_quantizer.quant_core import (
    InputError,
    QuantConfig,
    SafetensorsSource,
    TensorInfo,
    quantize_model,
)
from comfyui_quantizer.quant_core.detect import detect
from comfyui_quantizer.quant_core.plan import Action, Plan, build_plan
from comfyui_quantizer.quant_core.rules import RuleOptions, decide_all

PlanOf = Callable[..., Plan]


@pytest.fixture
def model_file(write_model: Callable[..., Path], tiny_archs: ModuleType) -> Callable[[str], Path]:
    def _file(name: str) -> Path:
        return write_model(tiny_archs.BUILDERS[name](), name=f"{name}.safetensors")

    return _file


@pytest.fixture
def plan_of(model_file: Callable[[str], Path]) -> PlanOf:
    def _plan(name: str, **config: object) -> Plan:
        with SafetensorsSource(model_file(name)) as src:
            return build_plan(src, QuantConfig(**config))  # type: ignore[arg-type]

    return _plan


def action(plan: Plan, key: str) -> Action:
    return next(e.action for e in plan.entries if e.key == key)


def reason(plan: Plan, key: str) -> str:
    return next(e.reason for e in plan.entries if e.key == key)


def out_dtype(plan: Plan, key: str) -> str:
    return next(t.dtype for t in plan.outputs if t.name == key)


Q, K, D = Action.QUANTIZE, Action.KEEP, Action.DROP


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("flux1-dev", "flux1-dev"),
        ("flux1-schnell", "flux1-schnell"),  # no guidance_in: that is how ComfyUI tells them
        ("flux2", "flux2"),
        ("chroma", "chroma"),
        ("chroma-radiance", "chroma-radiance"),
        ("wan", "wan"),
        ("wan-i2v", "wan-i2v"),
        ("hunyuan-video", "hunyuan-video"),
        ("qwen-image", "qwen-image"),
        ("z-image", "z-image"),  # 3840 wide: ComfyUI's own rule
        ("lumina2", "lumina2"),
        ("ltxv2", "ltxv2"),
        ("krea2", "krea2"),
        ("anima", "anima @net."),
        ("t5-xxl", "t5-xxl"),
        ("t5-xxl-old", "t5-xxl-old"),
        ("llama", "llama"),
        ("qwen2.5-vl", "qwen2.5-vl"),
        ("qwen3", "qwen3"),
        ("gemma", "gemma"),
        ("mistral3", "mistral3"),
        ("vae", "vae"),
    ],
)
def test_detects_architecture(plan_of: PlanOf, name: str, arch: str) -> None:
    plan = plan_of(name)
    assert plan.architecture == arch
    # An auto-detected model gives no "not recognised" or "does not fit" warning.
    assert not any("not recognised" in n or "does not fit" in n for n in plan.notes)


def test_flux1_dev(plan_of: PlanOf) -> None:
    p = plan_of("flux1-dev")
    # ComfyUI's detect_unet_config sizes the model from these shapes.
    assert action(p, "img_in.weight") is K  # in_channels, hidden_size
    assert action(p, "txt_in.weight") is K  # context_in_dim
    assert action(p, "vector_in.in_layer.weight") is K  # vec_in_dim
    assert "loader reads" in reason(p, "img_in.weight")
    # The output projection writes the prediction directly.
    assert action(p, "final_layer.linear.weight") is K
    # RMSNorm scales (1-D; also the key detection looks for).
    assert action(p, "double_blocks.0.img_attn.norm.key_norm.scale") is K
    # The bulk: attention, MLP and modulation linears of every block.
    for key in (
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.1.txt_mlp.2.weight",
        "double_blocks.0.img_mod.lin.weight",
        "single_blocks.1.linear1.weight",
    ):
        assert action(p, key) is Q, key
    assert action(p, "double_blocks.0.img_attn.qkv.bias") is K  # biases are added, not multiplied


def test_chroma(plan_of: PlanOf) -> None:
    p = plan_of("chroma")
    # The approximator produces every block's modulation: an error here shifts all blocks.
    assert action(p, "distilled_guidance_layer.layers.0.in_layer.weight") is K
    assert action(p, "distilled_guidance_layer.out_proj.weight") is K
    assert action(p, "img_in.weight") is K  # shape read by the loader
    assert action(p, "single_blocks.0.linear1.weight") is Q


def test_chroma_radiance(plan_of: PlanOf) -> None:
    p = plan_of("chroma-radiance")
    # The NeRF blocks generate the per-patch pixel MLP weights (a hypernetwork).
    assert action(p, "nerf_blocks.0.param_generator.weight") is K
    # A conv whose kernel size the loader reads as the patch size.
    assert action(p, "img_in_patch.weight") is K
    # Marker: ComfyUI only checks that __x0__ exists, so it must be written as it is.
    assert action(p, "__x0__") is K and "__x0__" in {t.name for t in p.outputs}
    assert action(p, "double_blocks.0.txt_attn.qkv.weight") is Q


def test_flux2(plan_of: PlanOf) -> None:
    p = plan_of("flux2")
    # Flux.2 has one modulation for all blocks instead of one per block.
    assert action(p, "double_stream_modulation_img.lin.weight") is K
    assert action(p, "single_stream_modulation.lin.weight") is K
    assert action(p, "img_in.weight") is K  # shape read by the loader
    assert action(p, "double_blocks.0.img_mlp.0.weight") is Q


def test_wan(plan_of: PlanOf) -> None:
    p = plan_of("wan")
    # ComfyUI reads head.head's rows (out_dim) and block 0's ffn.0 rows (ffn_dim).
    assert action(p, "head.head.weight") is K
    assert action(p, "blocks.0.ffn.0.weight") is K
    assert action(p, "blocks.1.ffn.0.weight") is Q  # the same layer in block 1 is not read
    # time_projection turns the timestep into the modulation of every block.
    assert action(p, "time_projection.1.weight") is K
    assert action(p, "blocks.0.modulation") is K  # a 3-D parameter added to the modulation
    assert action(p, "blocks.1.self_attn.q.weight") is Q
    i2v = plan_of("wan-i2v")
    assert action(i2v, "img_emb.proj.1.weight") is K  # the image conditioning input MLP
    assert action(i2v, "blocks.0.cross_attn.k_img.weight") is Q


def test_hunyuan_video(plan_of: PlanOf) -> None:
    p = plan_of("hunyuan-video")
    assert action(p, "txt_in.input_embedder.weight") is K  # context_in_dim is read from it
    assert action(p, "final_layer.linear.weight") is K  # out_channels is read from it
    assert action(p, "img_in.proj.weight") is K  # 5-D patch conv
    assert action(p, "double_blocks.0.img_attn_q_norm.weight") is K  # attention norm
    assert action(p, "double_blocks.0.img_attn_qkv.weight") is Q
    assert action(p, "single_blocks.0.linear2.weight") is Q


def test_qwen_image(plan_of: PlanOf) -> None:
    p = plan_of("qwen-image")
    assert action(p, "img_in.weight") is K  # in_channels is read from it
    assert action(p, "txt_norm.weight") is K  # norm; also the detection key
    assert action(p, "proj_out.weight") is K  # output projection
    # Only the first block's image modulation stays; the same layer of block 1 is quantized.
    assert action(p, "transformer_blocks.0.img_mod.1.weight") is K
    assert action(p, "transformer_blocks.1.img_mod.1.weight") is Q
    assert action(p, "transformer_blocks.1.attn.to_q.weight") is Q


def test_z_image_and_its_refiner_preset(plan_of: PlanOf) -> None:
    p = plan_of("z-image")
    assert action(p, "cap_embedder.1.weight") is K  # the model width is read from it
    assert action(p, "layers.0.adaLN_modulation.0.weight") is K  # scales whole activations
    assert action(p, "x_pad_token") is K  # a parameter, not a layer weight
    assert action(p, "layers.1.attention.qkv.weight") is Q
    assert action(p, "context_refiner.0.attention.qkv.weight") is Q
    refiner = plan_of("z-image", rules=RuleOptions(preset="zimage_refiner"))
    assert action(refiner, "context_refiner.0.attention.qkv.weight") is K
    assert action(refiner, "noise_refiner.1.feed_forward.w2.weight") is K
    assert action(refiner, "layers.1.attention.qkv.weight") is Q
    assert not any("does not fit" in n for n in refiner.notes)  # a compatible choice


def test_ltx2_keeps_edge_blocks_counted_from_the_file(plan_of: PlanOf) -> None:
    p = plan_of("ltxv2", output_dtype="fp16")
    # The first two and last two of the 6 blocks stay; the middle ones are quantized.
    kept = [i for i in range(6) if action(p, f"transformer_blocks.{i}.attn1.to_q.weight") is K]
    assert kept == [0, 1, 4, 5]
    assert action(p, "adaln_single.linear.weight") is K  # timestep -> every block's modulation
    assert action(p, "audio_patchify_proj.weight") is K  # audio latent input projection
    # adaLN tables are added to the timestep embedding: written as stored, not cast to fp16,
    # while other kept floats follow --output-dtype.
    assert out_dtype(p, "transformer_blocks.2.scale_shift_table") == "BF16"
    assert out_dtype(p, "transformer_blocks.2.attn1.q_norm.weight") == "F16"


def test_krea2(plan_of: PlanOf) -> None:
    p = plan_of("krea2")
    assert action(p, "first.weight") is K  # features/channels are read from it
    assert action(p, "blocks.0.attn.wq.weight") is K  # heads = rows / head_dim
    assert action(p, "blocks.1.attn.wq.weight") is Q
    assert action(p, "txtfusion.projector.weight") is K  # number of text layers is read
    assert action(p, "tproj.1.weight") is K  # modulation projection shared by every block
    assert action(p, "blocks.0.mlp.gate.weight") is Q


def test_anima_under_its_net_prefix(plan_of: PlanOf) -> None:
    p = plan_of("anima")
    assert action(p, "net.x_embedder.proj.1.weight") is K  # model width is read from it
    assert action(p, "net.llm_adapter.blocks.0.cross_attn.q_proj.weight") is K  # text path
    assert action(p, "net.blocks.0.self_attn.q_proj.weight") is K  # the first block stays
    assert action(p, "net.blocks.2.self_attn.q_proj.weight") is Q


def test_t5xxl_drops_the_decoder_and_keeps_the_dtype_the_loader_reads(plan_of: PlanOf) -> None:
    p = plan_of("t5-xxl", output_dtype="fp16")
    # ComfyUI's T5 is an encoder: decoder and lm_head are never loaded, so they are dropped.
    assert action(p, "decoder.block.0.layer.0.SelfAttention.q.weight") is D
    assert action(p, "decoder.final_layer_norm.weight") is D  # even 1-D decoder tensors
    assert action(p, "lm_head.weight") is D
    outputs = {t.name for t in p.outputs}
    assert not any(k.startswith(("decoder.", "lm_head")) for k in outputs)
    assert action(p, "shared.weight") is K  # token embedding table
    assert action(p, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") is K
    assert action(p, "encoder.block.1.layer.0.SelfAttention.q.weight") is Q
    assert action(p, "encoder.block.0.layer.1.DenseReluDense.wi_1.weight") is Q
    # t5_xxl_detect takes T5's compute dtype from final_layer_norm: it keeps its dtype.
    assert out_dtype(p, "encoder.final_layer_norm.weight") == "BF16"
    assert out_dtype(p, "encoder.block.0.layer.0.layer_norm.weight") == "F16"
    assert any("dropped" in n for n in p.notes)


@pytest.mark.parametrize("name", ["llama", "qwen2.5-vl", "qwen3", "gemma", "mistral3"])
def test_llm_text_encoders(plan_of: PlanOf, name: str) -> None:
    p = plan_of(name, output_dtype="fp16")
    assert action(p, "model.embed_tokens.weight") is K  # embedding table
    assert action(p, "lm_head.weight") is K
    assert action(p, "model.layers.1.self_attn.q_proj.weight") is Q
    assert action(p, "model.layers.0.mlp.down_proj.weight") is Q
    # llama_detect takes the compute dtype from model.norm: it keeps its dtype.
    assert out_dtype(p, "model.norm.weight") == "BF16"
    assert out_dtype(p, "model.layers.1.input_layernorm.weight") == "F16"


def test_qwen_vl_vision_tower_input_and_merger_stay(plan_of: PlanOf) -> None:
    p = plan_of("qwen2.5-vl")
    assert action(p, "visual.merger.mlp.0.weight") is K
    assert action(p, "visual.blocks.0.attn.qkv.weight") is K
    assert action(p, "visual.blocks.1.attn.qkv.weight") is Q


@pytest.mark.parametrize(
    ("name", "label"),
    [("clip-l", "CLIP-L"), ("clip-g", "CLIP-G"), ("t5-base", "T5 (not XXL"), ("t5-xl", "T5-XL"),
     ("t5-gemma", "T5-Gemma")],
)  # fmt: skip
def test_text_encoders_comfyui_cannot_load_quantized_are_refused(
    model_file: Callable[[str], Path], tmp_path: Path, name: str, label: str
) -> None:
    out = tmp_path / "out.safetensors"
    with SafetensorsSource(model_file(name)) as src, pytest.raises(InputError) as e:
        quantize_model(src, QuantConfig(), out)
    assert label in str(e.value) and "silently wrong" in str(e.value)
    assert not out.exists() and list(tmp_path.glob(".*partial")) == []


def test_full_checkpoint_is_recognised_per_prefix(plan_of: PlanOf) -> None:
    p = plan_of("flux-checkpoint")
    assert p.architecture is not None
    for part in (
        "flux1-dev @model.diffusion_model.",
        "t5-xxl @text_encoders.t5xxl.transformer.",
        "clip-l @text_encoders.clip_l.transformer.",
        "vae @vae.",
    ):
        assert part in p.architecture
    dm, t5, cl = (
        "model.diffusion_model.",
        "text_encoders.t5xxl.transformer.",
        "text_encoders.clip_l",
    )
    assert action(p, dm + "img_in.weight") is K  # the prefix is stripped before the rules
    assert action(p, dm + "double_blocks.0.img_attn.qkv.weight") is Q
    assert action(p, t5 + "encoder.block.0.layer.0.SelfAttention.q.weight") is Q
    # CLIP inside a checkpoint stays whole (refusing would block every Flux checkpoint).
    assert action(p, cl + ".transformer.text_model.encoder.layers.0.mlp.fc1.weight") is K
    assert "ignores quantization" in reason(
        p, cl + ".transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    )
    # The VAE is loaded without quantized layers: even its 2-D weights stay.
    assert action(p, "vae.decoder.fake_linear.weight") is K
    assert any("CLIP-L" in n for n in p.notes)


def test_unknown_model_gets_base_rules_and_a_warning_naming_its_keys(
    tiny_model: Path,
) -> None:
    with SafetensorsSource(tiny_model) as src:
        p = build_plan(src, QuantConfig())
    assert p.architecture == "unknown"
    warning = next(n for n in p.notes if "not recognised" in n)
    assert "blocks.N.attn.qkv" in warning  # the keys it saw, block indices folded
    assert action(p, "embed_tokens.weight") is K  # embedding (base rule)
    assert action(p, "blocks.0.norm1.weight") is K
    assert action(p, "blocks.0.attn.qkv.weight") is Q


def test_explicit_preset_that_contradicts_detection_warns_and_applies(plan_of: PlanOf) -> None:
    p = plan_of("flux1-dev", rules=RuleOptions(preset="wan"))
    warning = next(n for n in p.notes if "does not fit" in n)
    assert "Flux.1 dev" in warning and "wan" in warning
    assert "guidance_in.in_layer.weight" in warning  # the evidence it was detected from
    # The WAN rules were applied as asked: Flux's final layer is no longer kept.
    assert action(p, "final_layer.linear.weight") is Q
    compatible = plan_of("flux1-dev", rules=RuleOptions(preset="distillation_large"))
    assert not any("does not fit" in n for n in compatible.notes)
    # A text-encoder preset on a file with a single part is applied as asked too.
    t5 = plan_of("flux1-dev", rules=RuleOptions(preset="t5xxl"))
    assert any("'t5xxl' does not fit the detected Flux.1 dev" in n for n in t5.notes)
    assert action(t5, "img_in.weight") is Q  # only the base rules and T5's rules applied


def test_detection_reads_no_tensor_data(model_file: Callable[[str], Path]) -> None:
    """Detection works from the header alone: overwrite every data byte and detect again."""
    path = model_file("flux1-dev")
    with SafetensorsSource(path) as src:
        before = detect(src.tensors()).summary
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    raw[header_end:] = b"\xff" * (len(raw) - header_end)  # every value becomes NaN
    path.write_bytes(bytes(raw))
    with SafetensorsSource(path) as src:
        assert detect(src.tensors()).summary == before == "flux1-dev"


# Each diffusers layout ComfyUI converts at load (model_detection.convert_diffusers_mmdit and the
# diffusers UNet path), by the keys ComfyUI itself tests for.
DIFFUSERS_LAYOUTS = {
    "diffusers-flux": ("x_embedder.weight", "single_transformer_blocks.0.attn.to_q.weight",
                       "transformer_blocks.0.attn.to_q.weight"),
    "diffusers-sd3": ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight"),
    "diffusers-auraflow": ("joint_transformer_blocks.0.attn.add_k_proj.weight",),
    "diffusers-pixart": ("adaln_single.emb.timestep_embedder.linear_1.bias",
                         "pos_embed.proj.bias", "transformer_blocks.0.attn1.to_q.weight"),
    "diffusers-z-image": ("noise_refiner.0.attention.norm_k.weight",
                          "layers.0.attention.to_q.weight"),
    "diffusers-unet": ("conv_in.weight",
                       "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(DIFFUSERS_LAYOUTS))
def test_diffusers_layouts_are_refused_before_any_work(arch: str) -> None:
    infos = {k: TensorInfo(k, "BF16", (64, 64)) for k in DIFFUSERS_LAYOUTS[arch]}
    assert detect(infos).components[0].arch == arch
    with pytest.raises(InputError) as e:
        decide_all("model.safetensors", infos, QuantConfig())
    message = str(e.value)
    assert message.startswith("model.safetensors: ") and "diffusers layout" in message
    assert "silently wrong" in message and "MODEL" in message


def test_native_layouts_sharing_diffusers_key_names_are_not_refused(plan_of: PlanOf) -> None:
    """Qwen-Image names its blocks transformer_blocks.N.attn.add_q_proj; Lumina/Z-Image use
    x_embedder.weight; LTX uses adaln_single: none of them is converted by ComfyUI."""
    for name in ("qwen-image", "z-image", "lumina2", "ltxv2"):
        assert not plan_of(name).architecture.startswith("diffusers"), name
