"""Tiny state dicts with the real key names of each architecture ComfyUI loads.

Key names follow ComfyUI's model code (``comfy/ldm/*``) and the files it loads; shapes are
small (hidden size 32) except where a loader or ComfyUI's own detection reads a size (T5-XXL's
10240-wide feed-forward, Mistral 3's 5120-wide norm, Z-Image's 3840-wide caption embedder):
there the real size is used on the dimension that is read. Values are small random numbers
(never zeros). Loaded by the ``tiny_archs`` fixture in ``tests/conftest.py``.
"""

from __future__ import annotations

import torch

H = 32  # hidden size: a multiple of 16, so every bulk linear is quantizable


class _Model:
    """Collects tensors with a deterministic generator."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.sd: dict[str, torch.Tensor] = {}

    def w(self, key: str, *shape: int) -> None:
        self.sd[key] = (torch.randn(*shape, generator=self.g) * 0.05).to(self.dtype)

    def norm(self, key: str, size: int) -> None:
        self.sd[key] = (1 + 0.1 * torch.randn(size, generator=self.g)).to(self.dtype)

    def linear(self, name: str, out: int, inp: int, bias: bool = True) -> None:
        self.w(f"{name}.weight", out, inp)
        if bias:
            self.w(f"{name}.bias", out)


def _flux_blocks(m: _Model, *, modulation: bool, double: int = 2, single: int = 2) -> None:
    for i in range(double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            if modulation:
                m.linear(f"{p}_mod.lin", 6 * H, H)
            m.linear(f"{p}_attn.qkv", 3 * H, H)
            m.norm(f"{p}_attn.norm.query_norm.scale", H // 4)
            m.norm(f"{p}_attn.norm.key_norm.scale", H // 4)
            m.linear(f"{p}_attn.proj", H, H)
            m.linear(f"{p}_mlp.0", 4 * H, H)
            m.linear(f"{p}_mlp.2", H, 4 * H)
    for i in range(single):
        p = f"single_blocks.{i}"
        m.linear(f"{p}.linear1", 7 * H, H)
        m.linear(f"{p}.linear2", H, 5 * H)
        m.norm(f"{p}.norm.query_norm.scale", H // 4)
        m.norm(f"{p}.norm.key_norm.scale", H // 4)
        if modulation:
            m.linear(f"{p}.modulation.lin", 3 * H, H)


def flux1(guidance: bool = True) -> dict[str, torch.Tensor]:
    """Flux.1 dev (``guidance_in``) or schnell (without)."""
    m = _Model(1)
    m.linear("img_in", H, 64)
    m.linear("txt_in", H, 64)
    m.linear("time_in.in_layer", H, 64)
    m.linear("time_in.out_layer", H, H)
    m.linear("vector_in.in_layer", H, 48)
    m.linear("vector_in.out_layer", H, H)
    if guidance:
        m.linear("guidance_in.in_layer", H, 64)
        m.linear("guidance_in.out_layer", H, H)
    _flux_blocks(m, modulation=True)
    m.linear("final_layer.linear", 64, H)
    m.linear("final_layer.adaLN_modulation.1", 2 * H, H)
    return m.sd


def flux2() -> dict[str, torch.Tensor]:
    m = _Model(2)
    m.linear("img_in", H, 128, bias=False)
    m.linear("txt_in", H, 64, bias=False)
    m.linear("time_in.in_layer", H, 64, bias=False)
    m.linear("time_in.out_layer", H, H, bias=False)
    m.linear("double_stream_modulation_img.lin", 6 * H, H, bias=False)
    m.linear("double_stream_modulation_txt.lin", 6 * H, H, bias=False)
    m.linear("single_stream_modulation.lin", 3 * H, H, bias=False)
    _flux_blocks(m, modulation=False)
    m.linear("final_layer.linear", 128, H, bias=False)
    m.linear("final_layer.adaLN_modulation.1", 2 * H, H, bias=False)
    return m.sd


def _approximator(m: _Model) -> None:
    m.linear("distilled_guidance_layer.in_proj", 64, 64)
    for i in range(2):
        m.linear(f"distilled_guidance_layer.layers.{i}.in_layer", 64, 64)
        m.linear(f"distilled_guidance_layer.layers.{i}.out_layer", 64, 64)
        m.norm(f"distilled_guidance_layer.norms.{i}.scale", 64)
    m.linear("distilled_guidance_layer.out_proj", H, 64)


def chroma() -> dict[str, torch.Tensor]:
    m = _Model(3)
    m.linear("img_in", H, 64)
    m.linear("txt_in", H, 64)
    _approximator(m)
    _flux_blocks(m, modulation=False)
    m.linear("final_layer.linear", 64, H)
    return m.sd


def chroma_radiance() -> dict[str, torch.Tensor]:
    m = _Model(4)
    m.w("img_in_patch.weight", H, 3, 2, 2)  # a conv: Radiance works on pixels
    m.w("img_in_patch.bias", H)
    m.linear("txt_in", H, 64)
    _approximator(m)
    _flux_blocks(m, modulation=False)
    m.linear("nerf_image_embedder.embedder.0", 64, 32)
    for i in range(2):
        m.linear(f"nerf_blocks.{i}.param_generator", 128, H)
        m.norm(f"nerf_blocks.{i}.norm.scale", 64)
    m.norm("nerf_final_layer_conv.norm.scale", 64)
    m.w("nerf_final_layer_conv.conv.weight", 3, 64, 3, 3)
    m.sd["__x0__"] = torch.zeros(0, dtype=torch.bfloat16)  # marker: x0 prediction
    return m.sd


def wan(i2v: bool = False) -> dict[str, torch.Tensor]:
    m = _Model(5)
    m.w("patch_embedding.weight", H, 16, 1, 2, 2)
    m.w("patch_embedding.bias", H)
    m.linear("text_embedding.0", H, 64)
    m.linear("text_embedding.2", H, H)
    m.linear("time_embedding.0", H, 64)
    m.linear("time_embedding.2", H, H)
    m.linear("time_projection.1", 6 * H, H)
    for i in range(2):
        p = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                m.linear(f"{p}.{attn}.{proj}", H, H)
            m.norm(f"{p}.{attn}.norm_q.weight", H)
            m.norm(f"{p}.{attn}.norm_k.weight", H)
        if i2v:
            m.linear(f"{p}.cross_attn.k_img", H, H)
            m.linear(f"{p}.cross_attn.v_img", H, H)
        m.norm(f"{p}.norm3.weight", H)
        m.linear(f"{p}.ffn.0", 4 * H, H)
        m.linear(f"{p}.ffn.2", H, 4 * H)
        m.w(f"{p}.modulation", 1, 6, H)
    if i2v:
        m.norm("img_emb.proj.0.weight", 64)
        m.w("img_emb.proj.0.bias", 64)
        m.linear("img_emb.proj.1", 64, 64)
        m.linear("img_emb.proj.3", H, 64)
    m.linear("head.head", 64, H)
    m.w("head.modulation", 1, 2, H)
    return m.sd


def hunyuan_video() -> dict[str, torch.Tensor]:
    m = _Model(6)
    m.w("img_in.proj.weight", H, 16, 1, 2, 2)
    m.linear("txt_in.input_embedder", H, 64)
    m.linear("txt_in.t_embedder.mlp.0", H, 64)
    m.linear("txt_in.c_embedder.linear_1", H, 64)
    r = "txt_in.individual_token_refiner.blocks.0"
    m.norm(f"{r}.norm1.weight", H)
    m.linear(f"{r}.self_attn_qkv", 3 * H, H)
    m.linear(f"{r}.mlp.fc1", 4 * H, H)
    m.linear(f"{r}.adaLN_modulation.1", 2 * H, H)
    m.linear("time_in.mlp.0", H, 64)
    m.linear("vector_in.in_layer", H, 48)
    m.linear("guidance_in.mlp.0", H, 64)
    for s in ("img", "txt"):
        p = f"double_blocks.0.{s}"
        m.linear(f"{p}_mod.linear", 6 * H, H)
        m.linear(f"{p}_attn_qkv", 3 * H, H)
        m.norm(f"{p}_attn_q_norm.weight", H // 4)
        m.norm(f"{p}_attn_k_norm.weight", H // 4)
        m.linear(f"{p}_attn_proj", H, H)
        m.linear(f"{p}_mlp.fc1", 4 * H, H)
        m.linear(f"{p}_mlp.fc2", H, 4 * H)
    m.linear("single_blocks.0.linear1", 7 * H, H)
    m.linear("single_blocks.0.linear2", H, 5 * H)
    m.norm("single_blocks.0.q_norm.weight", H // 4)
    m.linear("single_blocks.0.modulation.linear", 3 * H, H)
    m.linear("final_layer.linear", 64, H)
    m.linear("final_layer.adaLN_modulation.1", 2 * H, H)
    return m.sd


def qwen_image() -> dict[str, torch.Tensor]:
    m = _Model(7)
    m.linear("img_in", H, 64)
    m.linear("txt_in", H, 48)
    m.norm("txt_norm.weight", 48)
    m.linear("time_text_embed.timestep_embedder.linear_1", H, 64)
    m.linear("time_text_embed.timestep_embedder.linear_2", H, H)
    for i in range(2):
        p = f"transformer_blocks.{i}"
        m.linear(f"{p}.img_mod.1", 6 * H, H)
        m.linear(f"{p}.txt_mod.1", 6 * H, H)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            m.linear(f"{p}.attn.{proj}", H, H)
        m.linear(f"{p}.attn.to_out.0", H, H)
        m.linear(f"{p}.attn.to_add_out", H, H)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            m.norm(f"{p}.attn.{n}.weight", H // 4)
        for s in ("img", "txt"):
            m.linear(f"{p}.{s}_mlp.net.0.proj", 4 * H, H)
            m.linear(f"{p}.{s}_mlp.net.2", H, 4 * H)
    m.linear("norm_out.linear", 2 * H, H)
    m.linear("proj_out", 64, H)
    return m.sd


def _lumina_block(m: _Model, p: str, *, modulation: str | None) -> None:
    m.linear(f"{p}.attention.qkv", 3 * H, H, bias=False)
    m.linear(f"{p}.attention.out", H, H, bias=False)
    m.norm(f"{p}.attention.q_norm.weight", H // 4)
    m.norm(f"{p}.attention.k_norm.weight", H // 4)
    for w in ("w1", "w3"):
        m.linear(f"{p}.feed_forward.{w}", 3 * H, H, bias=False)
    m.linear(f"{p}.feed_forward.w2", H, 3 * H, bias=False)
    for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
        m.norm(f"{p}.{n}.weight", H)
    if modulation is not None:
        m.linear(f"{p}.adaLN_modulation.{modulation}", 4 * H, 64)


def z_image(cap_dim: int = 3840, modulation_index: str = "0") -> dict[str, torch.Tensor]:
    """Z-Image: ComfyUI tells it from Lumina 2 by the 3840 rows of cap_embedder.1 (the model
    width; only that dimension is real here) and builds its modulation without a SiLU in front
    (``adaLN_modulation.0``). ``z_image(H, "1")`` is the Lumina 2 layout."""
    m = _Model(8)
    m.linear("x_embedder", H, 64)
    m.norm("cap_embedder.0.weight", 48)
    m.linear("cap_embedder.1", cap_dim, 48)
    m.linear("t_embedder.mlp.0", H, 64)
    m.linear("t_embedder.mlp.2", 64, H)
    for i in range(2):
        _lumina_block(m, f"noise_refiner.{i}", modulation=modulation_index)
        _lumina_block(m, f"context_refiner.{i}", modulation=None)
        _lumina_block(m, f"layers.{i}", modulation=modulation_index)
    m.linear("final_layer.linear", 64, H)
    m.linear("final_layer.adaLN_modulation.1", H, 64)
    m.w("x_pad_token", 1, H)
    m.w("cap_pad_token", 1, H)
    return m.sd


def ltx2(blocks: int = 6) -> dict[str, torch.Tensor]:
    m = _Model(9)
    for ada in ("adaln_single", "audio_adaln_single"):
        m.linear(f"{ada}.emb.timestep_embedder.linear_1", H, 64)
        m.linear(f"{ada}.emb.timestep_embedder.linear_2", H, H)
        m.linear(f"{ada}.linear", 6 * H, H)
    m.linear("patchify_proj", H, 64)
    m.linear("audio_patchify_proj", H, 32)
    m.linear("caption_projection.linear_1", H, 64)
    for i in range(blocks):
        p = f"transformer_blocks.{i}"
        for attn in ("attn1", "attn2", "audio_attn1"):
            for proj in ("to_q", "to_v"):
                m.linear(f"{p}.{attn}.{proj}", H, H)
            m.linear(f"{p}.{attn}.to_k", H, 64 if attn == "attn2" else H)
            m.linear(f"{p}.{attn}.to_out.0", H, H)
            m.norm(f"{p}.{attn}.q_norm.weight", H)
        m.linear(f"{p}.ff.net.0.proj", 4 * H, H)
        m.linear(f"{p}.ff.net.2", H, 4 * H)
        m.w(f"{p}.scale_shift_table", 6, H)
    m.w("scale_shift_table", 2, H)
    m.linear("proj_out", 64, H)
    m.linear("audio_proj_out", 32, H)
    return m.sd


def krea2() -> dict[str, torch.Tensor]:
    m = _Model(10)
    m.linear("first", H, 64)
    for i in range(2):
        p = f"blocks.{i}"
        for w in ("wq", "wk", "wv", "gate", "wo"):
            m.linear(f"{p}.attn.{w}", H, H, bias=False)
        m.norm(f"{p}.attn.qknorm.qnorm.scale", H // 4)
        m.linear(f"{p}.mlp.gate", 3 * H, H, bias=False)
        m.linear(f"{p}.mlp.up", 3 * H, H, bias=False)
        m.linear(f"{p}.mlp.down", H, 3 * H, bias=False)
        m.w(f"{p}.mod.lin", 6 * H)
        m.norm(f"{p}.prenorm.scale", H)
    m.linear("tmlp.0", H, 64)
    m.linear("tmlp.2", H, H)
    m.norm("txtfusion.layerwise_blocks.0.prenorm.scale", 48)
    m.linear("txtfusion.layerwise_blocks.0.attn.wq", 48, 48, bias=False)
    m.linear("txtfusion.projector", 1, 4, bias=False)
    m.norm("txtmlp.0.scale", 48)
    m.linear("txtmlp.1", H, 48)
    m.linear("txtmlp.3", H, H)
    m.linear("tproj.1", 6 * H, H)
    m.linear("last.linear", 64, H)
    m.w("last.modulation.lin", 2, H)
    return m.sd


def anima() -> dict[str, torch.Tensor]:
    """Anima (Cosmos Predict2 + LLM adapter), stored under ``net.`` like the released files."""
    m = _Model(11)
    m.linear("net.x_embedder.proj.1", H, 68, bias=False)
    m.linear("net.t_embedder.1.linear_1", H, H, bias=False)
    m.linear("net.t_embedder.1.linear_2", 3 * H, H, bias=False)
    for i in range(3):
        p = f"net.blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
                m.linear(f"{p}.{attn}.{proj}", H, H, bias=False)
            m.norm(f"{p}.{attn}.q_norm.weight", H // 4)
            m.linear(f"{p}.adaln_modulation_{attn}.1", 16, H, bias=False)
            m.linear(f"{p}.adaln_modulation_{attn}.2", 3 * H, 16, bias=False)
        m.linear(f"{p}.mlp.layer1", 4 * H, H, bias=False)
        m.linear(f"{p}.mlp.layer2", H, 4 * H, bias=False)
    m.linear("net.final_layer.linear", 64, H, bias=False)
    m.linear("net.llm_adapter.blocks.0.cross_attn.q_proj", H, H, bias=False)
    m.linear("net.llm_adapter.blocks.0.mlp.0", 4 * H, H)
    return m.sd


def t5(
    decoder: bool = False, d: int = 16, ff: int = 10240, gated: bool = True, last: int = 23
) -> dict[str, torch.Tensor]:
    """A T5 encoder (and decoder) with blocks 0, 1 and ``last``. ComfyUI's ``detect_te_model``
    reads block 23's feed-forward: gated 10240 wide = T5-XXL, 5120 = T5-XL, ungated (``wi``) =
    T5-XXL v1.0; no block 23 = its T5-base loader. ``d_model`` stays tiny."""
    m = _Model(12)
    m.w("shared.weight", 128, d)
    for part in ("encoder", "decoder") if decoder else ("encoder",):
        for i in sorted({0, 1, last}):
            p = f"{part}.block.{i}.layer"
            for proj in ("q", "k", "v", "o"):
                m.w(f"{p}.0.SelfAttention.{proj}.weight", d, d)
            if i == 0:
                m.w(f"{p}.0.SelfAttention.relative_attention_bias.weight", 32, 4)
            m.norm(f"{p}.0.layer_norm.weight", d)
            n = 2 if part == "decoder" else 1  # decoder layer 1 is cross-attention
            if part == "decoder":
                m.w(f"{p}.1.EncDecAttention.q.weight", d, d)
            for wi in ("wi_0", "wi_1") if gated else ("wi",):
                m.w(f"{p}.{n}.DenseReluDense.{wi}.weight", ff, d)
            m.w(f"{p}.{n}.DenseReluDense.wo.weight", d, ff)
            m.norm(f"{p}.{n}.layer_norm.weight", d)
        m.norm(f"{part}.final_layer_norm.weight", d)
    if decoder:
        m.w("lm_head.weight", 128, d)
    return m.sd


def t5xxl(decoder: bool = True, d: int = 16) -> dict[str, torch.Tensor]:
    """T5-XXL: ``d_model`` tiny, but block 23's gated feed-forward 10240 wide."""
    return t5(decoder=decoder, d=d)


def t5_gemma() -> dict[str, torch.Tensor]:
    """The keys ComfyUI tells T5-Gemma by (an encoder in Gemma's layer layout)."""
    m = _Model(16)
    m.w("model.encoder.embed_tokens.weight", 128, H)
    for i in range(2):
        p = f"model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m.linear(f"{p}.self_attn.{proj}", H, H, bias=False)
        m.linear(f"{p}.mlp.up_proj", 3 * H, H, bias=False)
        m.linear(f"{p}.mlp.down_proj", H, 3 * H, bias=False)
        m.norm(f"{p}.pre_self_attn_layernorm.weight", H)
    return m.sd


def llm(kind: str = "llama") -> dict[str, torch.Tensor]:
    """``llama``, ``qwen2.5-vl``, ``qwen3``, ``gemma`` or ``mistral3`` style text encoder."""
    m = _Model(13)
    hidden = 5120 if kind == "mistral3" else H  # ComfyUI tells Mistral 3 24B by this size
    m.w("model.embed_tokens.weight", 128, H)
    for i in range(2):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m.linear(f"{p}.self_attn.{proj}", H, H, bias=kind == "qwen2.5-vl" and proj != "o_proj")
        m.linear(f"{p}.mlp.gate_proj", 3 * H, H, bias=False)
        m.linear(f"{p}.mlp.up_proj", 3 * H, H, bias=False)
        m.linear(f"{p}.mlp.down_proj", H, 3 * H, bias=False)
        m.norm(f"{p}.input_layernorm.weight", H)
        m.norm(f"{p}.post_attention_layernorm.weight", hidden)
        if kind == "qwen3":
            m.norm(f"{p}.self_attn.q_norm.weight", H // 4)
        if kind == "gemma":
            m.norm(f"{p}.pre_feedforward_layernorm.weight", H)
            m.norm(f"{p}.post_feedforward_layernorm.weight", H)
    m.norm("model.norm.weight", H)
    if kind == "qwen2.5-vl":
        m.w("visual.patch_embed.proj.weight", H, 3, 2, 4, 4)
        for i in range(2):
            m.linear(f"visual.blocks.{i}.attn.qkv", 3 * H, H)
            m.linear(f"visual.blocks.{i}.mlp.up_proj", 2 * H, H)
        m.linear("visual.merger.mlp.0", 4 * H, 4 * H)
    if kind == "mistral3":
        m.w("vision_tower.patch_conv.weight", H, 3, 4, 4)
        m.linear("multi_modal_projector.linear_1", H, H)
    m.w("lm_head.weight", 128, H)
    return m.sd


def clip(layers: int = 12, width: int = H) -> dict[str, torch.Tensor]:
    """CLIP text model in the transformers layout: 12 layers = CLIP-L, 32 = CLIP-G."""
    m = _Model(14)
    m.w("text_model.embeddings.token_embedding.weight", 128, width)
    m.w("text_model.embeddings.position_embedding.weight", 77, width)
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            m.linear(f"{p}.self_attn.{proj}", width, width)
        m.linear(f"{p}.mlp.fc1", 4 * width, width)
        m.linear(f"{p}.mlp.fc2", width, 4 * width)
        m.norm(f"{p}.layer_norm1.weight", width)
        m.norm(f"{p}.layer_norm2.weight", width)
    m.norm("text_model.final_layer_norm.weight", width)
    m.w("text_projection.weight", width, width)
    return m.sd


def vae() -> dict[str, torch.Tensor]:
    m = _Model(15)
    m.w("encoder.conv_in.weight", 32, 3, 3, 3)
    m.norm("encoder.down.0.block.0.norm1.weight", 32)
    m.w("encoder.mid.attn_1.q.weight", 32, 32, 1, 1)
    m.w("decoder.conv_in.weight", 32, 16, 3, 3)
    m.w("decoder.conv_out.weight", 3, 32, 3, 3)
    m.w("quant_conv.weight", 32, 32, 1, 1)
    m.w("decoder.fake_linear.weight", 32, 32)  # a 2-D weight: it must stay all the same
    return m.sd


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def flux_checkpoint() -> dict[str, torch.Tensor]:
    """A full Flux.1 dev checkpoint as ComfyUI saves it: model, T5-XXL, CLIP-L, VAE."""
    return {
        **prefixed("model.diffusion_model.", flux1()),
        **prefixed("text_encoders.t5xxl.transformer.", t5xxl(decoder=False)),
        **prefixed("text_encoders.clip_l.transformer.", clip()),
        **prefixed("vae.", vae()),
    }


BUILDERS = {
    "flux1-dev": flux1,
    "flux1-schnell": lambda: flux1(guidance=False),
    "flux2": flux2,
    "chroma": chroma,
    "chroma-radiance": chroma_radiance,
    "wan": wan,
    "wan-i2v": lambda: wan(i2v=True),
    "hunyuan-video": hunyuan_video,
    "qwen-image": qwen_image,
    "z-image": z_image,
    "lumina2": lambda: z_image(cap_dim=H, modulation_index="1"),
    "ltxv2": ltx2,
    "krea2": krea2,
    "anima": anima,
    "t5-xxl": t5xxl,
    "t5-xxl-old": lambda: t5(ff=64, gated=False),
    "t5-xl": lambda: t5(ff=5120),
    "t5-base": lambda: t5(ff=64, last=1),
    "t5-gemma": t5_gemma,
    "llama": llm,
    "qwen2.5-vl": lambda: llm("qwen2.5-vl"),
    "qwen3": lambda: llm("qwen3"),
    "gemma": lambda: llm("gemma"),
    "mistral3": lambda: llm("mistral3"),
    "clip-l": clip,
    "clip-g": lambda: clip(layers=32, width=16),
    "vae": vae,
    "flux-checkpoint": flux_checkpoint,
}
