"""Which model is this? Architecture detection from key names and shapes (header only).

A file is split into components by well-known prefixes (a full checkpoint holds the diffusion
model under ``model.diffusion_model.``, text encoders under ``text_encoders.<name>.``, the VAE
under ``vae.`` or ``first_stage_model.``, ...); keys under no prefix form the root component.
Each component is matched against :data:`SIGNATURES`, in order, first match wins. A signature
names keys that identify a family the way ComfyUI's own loaders tell them apart (for example
Flux vs Chroma: ``distilled_guidance_layer``; Flux.1 dev vs schnell: ``guidance_in``; T5-XXL:
the 10240-wide ``DenseReluDense`` of ComfyUI's ``detect_te_model``), plus, where the loader
itself only uses a size, that shape.

Nothing here reads tensor data: only names and shapes from the header.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .source import TensorInfo

DIFFUSION = "diffusion"
TEXT_ENCODER = "text_encoder"
CLIP = "clip"  # a text encoder ComfyUI's loader cannot load quantized (see the signatures)
VAE = "vae"
DIFFUSERS = "diffusers"  # a diffusion model in the diffusers layout, which ComfyUI converts
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Signature:
    """A model family: every ``requires`` regex matches some key, no ``excludes`` regex does,
    and, if given, ``shape = (regex, dim, size)``: some key fully matching ``regex`` has
    ``shape[dim] == size``. Keys are relative to the component prefix."""

    arch: str
    label: str
    preset: str
    role: str
    requires: tuple[str, ...]
    excludes: tuple[str, ...] = ()
    shape: tuple[str, int, int] | None = None
    also_fits: tuple[str, ...] = ()

    def evidence(self, keys: Mapping[str, TensorInfo]) -> tuple[str, ...] | None:
        """The keys that identify this family in ``keys``, or ``None`` if it does not match."""
        found: list[str] = []
        for regex in self.requires:
            pattern = re.compile(regex)
            hit = next((k for k in keys if pattern.search(k)), None)
            if hit is None:
                return None
            found.append(hit)
        for regex in self.excludes:
            pattern = re.compile(regex)
            if any(pattern.search(k) for k in keys):
                return None
        if self.shape is not None:
            regex, dim, size = self.shape
            pattern = re.compile(regex)
            hit = next(
                (
                    k
                    for k, info in keys.items()
                    if pattern.fullmatch(k) and len(info.shape) > dim and info.shape[dim] == size
                ),
                None,
            )
            if hit is None:
                return None
            found.append(f"{hit} {list(keys[hit].shape)}")
        return tuple(found)


_KEY_NORM = r"^double_blocks\.0\.img_attn\.norm\.key_norm\.(?:scale|weight)$"
_LUMINA = (r"^cap_embedder\.1\.weight$", r"^noise_refiner\.0\.attention\.k_norm\.weight$")
_LTX = r"^adaln_single\.emb\.timestep_embedder\.linear_1\.(?:weight|bias)$"
_T5 = r"^encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$"
_LLM_Q = r"^model\.layers\.0\.self_attn\.q_proj\.weight$"

SIGNATURES: tuple[Signature, ...] = (
    # --- diffusion models (Flux family first: Chroma and Flux.2 also carry Flux's keys) ------
    Signature(
        "chroma-radiance", "Chroma Radiance", "nerf_large", DIFFUSION,
        requires=(_KEY_NORM, r"^nerf_blocks\.0\.norm\.(?:scale|weight)$",
                  r"^distilled_guidance_layer\."),
    ),
    Signature(
        "chroma", "Chroma", "distillation_large", DIFFUSION,
        requires=(_KEY_NORM, r"^distilled_guidance_layer\.(?:0\.)?norms\.0\.(?:scale|weight)$"),
    ),
    Signature(
        "flux2", "Flux.2", "flux2", DIFFUSION,
        requires=(_KEY_NORM, r"^double_stream_modulation_img\.lin\.weight$"),
    ),
    Signature(
        "flux1-dev", "Flux.1 dev", "flux1", DIFFUSION,
        requires=(_KEY_NORM, r"^img_in\.weight$", r"^guidance_in\.in_layer\.weight$"),
        also_fits=("distillation_large",),
    ),
    Signature(
        "flux1-schnell", "Flux.1 schnell", "flux1", DIFFUSION,
        requires=(_KEY_NORM, r"^img_in\.weight$"),
        also_fits=("distillation_large",),
    ),
    Signature(
        "hunyuan-video-1.5", "Hunyuan Video 1.5", "hunyuan", DIFFUSION,
        requires=(r"^txt_in\.individual_token_refiner\.blocks\.0\.norm1\.weight$",
                  r"^cond_type_embedding\.weight$"),
    ),
    Signature(
        "hunyuan-video", "Hunyuan Video", "hunyuan", DIFFUSION,
        requires=(r"^txt_in\.individual_token_refiner\.blocks\.0\.norm1\.weight$",),
    ),
    Signature(
        "ltxv2", "LTX-Video 2 (audio+video)", "ltxv2", DIFFUSION,
        requires=(_LTX, r"^audio_adaln_single\.linear\.weight$"),
    ),
    Signature(
        "ltxv", "LTX-Video", "ltxv2", DIFFUSION,
        requires=(_LTX, r"^transformer_blocks\.0\.attn2\.to_k\.weight$"),
        excludes=(r"^pos_embed\.proj\.bias$",),  # PixArt in diffusers layout shares the key
    ),
    Signature(
        "wan-i2v", "WAN 2.x image-to-video", "wan", DIFFUSION,
        requires=(r"^head\.modulation$", r"^img_emb\.proj\.0\.(?:weight|bias)$"),
    ),
    Signature("wan", "WAN 2.x", "wan", DIFFUSION, requires=(r"^head\.modulation$",)),
    Signature(
        "z-image", "Z-Image", "zimage", DIFFUSION,
        requires=_LUMINA,
        shape=(r"cap_embedder\.1\.weight", 0, 3840),  # how ComfyUI tells it from Lumina 2
        also_fits=("zimage_refiner",),
    ),
    Signature(
        "lumina2", "Lumina 2 (Z-Image rules)", "zimage", DIFFUSION,
        requires=_LUMINA,
        also_fits=("zimage_refiner",),
    ),
    Signature(
        "qwen-image", "Qwen-Image", "qwen", DIFFUSION,
        requires=(r"^txt_norm\.weight$", r"^img_in\.weight$",
                  r"^transformer_blocks\.0\.img_mod\.1\.weight$"),
        excludes=(r"^transformer_blocks\.0\.img_mlp\.w1\.weight$",),  # Lens shares the rest
    ),
    Signature(
        "krea2", "Krea 2", "krea2", DIFFUSION,
        requires=(r"^txtfusion\.projector\.weight$", r"^first\.weight$"),
    ),
    Signature(
        "anima", "Anima", "anima", DIFFUSION,
        requires=(r"^blocks\.0\.mlp\.layer1\.weight$",
                  r"^llm_adapter\.blocks\.0\.cross_attn\.q_proj\.weight$"),
    ),
    # --- text encoders ComfyUI loads quantized silently wrong (it ignores the scales): refused
    # standalone, kept whole inside a checkpoint (role CLIP) ---------------------------------
    Signature(
        "clip-g", "CLIP-G", "clip", CLIP,
        requires=(r"^text_model\.encoder\.layers\.30\.mlp\.fc1\.weight$",),
    ),
    Signature(
        "clip-h", "CLIP-H", "clip", CLIP,
        requires=(r"^text_model\.encoder\.layers\.22\.mlp\.fc1\.weight$",),
    ),
    Signature(
        "clip-l", "CLIP-L", "clip", CLIP,
        requires=(r"^text_model\.encoder\.layers\.0\.mlp\.fc1\.weight$",),
    ),
    Signature(
        "clip-g", "CLIP-G (open_clip layout)", "clip", CLIP,
        requires=(r"^transformer\.resblocks\.30\.", r"^token_embedding\.weight$"),
    ),
    Signature(
        "clip", "CLIP (open_clip layout)", "clip", CLIP,
        requires=(r"^transformer\.resblocks\.0\.", r"^token_embedding\.weight$"),
    ),
    # --- text encoders -----------------------------------------------------------------------
    Signature(
        "t5-xxl", "T5-XXL / UMT5-XXL encoder", "t5xxl", TEXT_ENCODER,
        requires=(_T5,),
        shape=(r"encoder\.block\.23\.layer\.1\.DenseReluDense\.wi_1\.weight", 0, 10240),
    ),
    Signature(
        "t5-xxl-old", "T5-XXL v1.0 encoder (ungated)", "t5xxl", TEXT_ENCODER,
        requires=(_T5, r"^encoder\.block\.23\.layer\.1\.DenseReluDense\.wi\.weight$"),
    ),
    # T5 encoders ComfyUI does not load as T5-XXL (checked after the two signatures above).
    # Only its T5-XXL loaders (t5xxl_detect) pass the layers' quantization on; the T5-XL
    # (AuraFlow) and T5-base / ByT5 (Stable Audio, ACE, glyph) loaders ignore it and load the
    # 8-bit codes as plain weights: measured on a T5-base in ComfyUI, conditioning off by 94 %
    # instead of the 2 % the quantization itself costs.
    Signature(
        "t5-xl", "T5-XL", "clip", CLIP,
        requires=(_T5,),
        shape=(r"encoder\.block\.23\.layer\.1\.DenseReluDense\.wi_1\.weight", 0, 5120),
    ),
    Signature("t5-base", "T5 (not XXL: ComfyUI's T5-base loader)", "clip", CLIP, requires=(_T5,)),
    Signature(
        "t5-gemma", "T5-Gemma", "clip", CLIP,
        requires=(r"^model\.encoder\.layers\.0\.pre_self_attn_layernorm\.weight$",),
    ),
    Signature(
        "jina-clip-2", "Jina CLIP v2", "clip", CLIP,
        requires=(r"^model\.encoder\.layers\.0\.mixer\.Wqkv\.weight$",),
    ),
    Signature(
        "gemma", "Gemma-style LLM", "llm", TEXT_ENCODER,
        requires=(r"^model\.layers\.0\.post_feedforward_layernorm\.weight$",),
        also_fits=("mistral",),
    ),
    Signature(
        "qwen2.5-vl", "Qwen2.5-VL LLM", "llm", TEXT_ENCODER,
        requires=(r"^model\.layers\.0\.self_attn\.k_proj\.bias$", r"^visual\.blocks\.0\."),
        also_fits=("mistral",),
    ),
    Signature(
        "qwen2.5", "Qwen2.5 LLM", "llm", TEXT_ENCODER,
        requires=(r"^model\.layers\.0\.self_attn\.k_proj\.bias$",),
        also_fits=("mistral",),
    ),
    Signature(
        "qwen3", "Qwen3 LLM", "llm", TEXT_ENCODER,
        requires=(_LLM_Q, r"^model\.layers\.0\.self_attn\.q_norm\.weight$"),
        also_fits=("mistral",),
    ),
    Signature(
        "mistral3", "Mistral 3 (multimodal) LLM", "mistral", TEXT_ENCODER,
        requires=(_LLM_Q, r"(?:^|\.)multi_modal_projector\."),
        also_fits=("llm",),
    ),
    Signature(
        "mistral3", "Mistral 3 LLM", "mistral", TEXT_ENCODER,
        requires=(_LLM_Q,),
        shape=(r"model\.layers\.0\.post_attention_layernorm\.weight", 0, 5120),
        also_fits=("llm",),
    ),
    Signature(
        "llama", "Llama-style LLM", "llm", TEXT_ENCODER,
        requires=(_LLM_Q, r"^model\.layers\.0\.mlp\.gate_proj\.weight$"),
        also_fits=("mistral",),
    ),
    # --- a standalone VAE ----------------------------------------------------------------------
    Signature(
        "vae", "VAE", "vae", VAE,
        requires=(r"^(?:encoder|decoder)\.conv_(?:in|out)\.weight$",),
    ),
    # --- diffusion models in the diffusers layout (after every native layout): ComfyUI renames
    # and fuses their keys at load (convert_diffusers_mmdit, unet_to_diffusers), carrying only
    # the keys it knows: weight_scale and comfy_quant are dropped and the 8-bit codes run as
    # plain weights (measured on a tiny diffusers Flux: loads without a word, output off 1e8x).
    # Refused, with the way round (the MODEL route). -------------------------------------------
    Signature(
        "diffusers-auraflow", "AuraFlow", "base", DIFFUSERS,
        requires=(r"^joint_transformer_blocks\.0\.attn\.add_k_proj\.weight$",),
    ),
    Signature(
        "diffusers-pixart", "PixArt", "base", DIFFUSERS,
        requires=(r"^adaln_single\.emb\.timestep_embedder\.linear_1\.bias$",
                  r"^pos_embed\.proj\.bias$"),
    ),
    Signature(
        "diffusers-z-image", "Z-Image / Lumina", "base", DIFFUSERS,
        requires=(r"^noise_refiner\.0\.attention\.norm_k\.weight$",),
    ),
    Signature(
        "diffusers-flux", "Flux", "base", DIFFUSERS,
        requires=(r"^x_embedder\.weight$", r"^single_transformer_blocks\.0\."),
    ),
    Signature(
        "diffusers-sd3", "SD3", "base", DIFFUSERS,
        requires=(r"^transformer_blocks\.0\.attn\.add_q_proj\.weight$",
                  r"^pos_embed\.proj\.weight$"),
    ),
    Signature(
        "diffusers-unet", "Stable Diffusion UNet", "base", DIFFUSERS,
        requires=(r"^conv_in\.weight$",
                  r"^down_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.0\.attn1\."),
    ),
)  # fmt: skip

# Prefixes of the parts of a full checkpoint, and what may live under each.
_PREFIXES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.diffusion_model\."), DIFFUSION),
    (re.compile(r"^net\."), DIFFUSION),  # Cosmos / Anima
    (re.compile(r"^(?:first_stage_model|vae|audio_vae|vocoder)\."), VAE),
    (re.compile(r"^text_encoders\.[^.]+\.(?:transformer\.)?"), TEXT_ENCODER),
    (re.compile(r"^cond_stage_model\.(?:transformer\.)?"), TEXT_ENCODER),
    (re.compile(r"^conditioner\.embedders\.\d+\.(?:transformer\.|model\.)?"), TEXT_ENCODER),
    (re.compile(r"^text_encoder\.(?:transformer\.)?"), TEXT_ENCODER),
)
_ROLES_UNDER = {
    DIFFUSION: (DIFFUSION,),
    TEXT_ENCODER: (TEXT_ENCODER, CLIP),
    VAE: (VAE,),
    "": (DIFFUSION, TEXT_ENCODER, CLIP, VAE, DIFFUSERS),
}


@dataclass(frozen=True)
class Component:
    """One part of a file: its key prefix and the family it was recognised as."""

    prefix: str
    role: str
    arch: str | None
    label: str
    preset: str
    evidence: tuple[str, ...]
    keys: tuple[str, ...]
    also_fits: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"under {self.prefix}" if self.prefix else "at the top level"

    def fits(self, preset_name: str) -> bool:
        """Whether ``preset_name`` is a sensible choice for this component."""
        return preset_name in (self.preset, "base", *self.also_fits)


@dataclass(frozen=True)
class Detection:
    """All components of a file, most specific prefix first."""

    components: tuple[Component, ...]

    @property
    def summary(self) -> str:
        """``flux1-dev`` or, for several parts, ``flux1-dev @model.diffusion_model. + ...``."""
        parts = [c.arch or UNKNOWN for c in self.components]
        if len(self.components) == 1 and not self.components[0].prefix:
            return parts[0]
        return " + ".join(
            f"{p} @{c.prefix or '(top level)'}" for p, c in zip(parts, self.components, strict=True)
        )

    def component_for(self, key: str) -> Component:
        """The component that owns ``key`` (longest matching prefix)."""
        for component in self.components:
            if key.startswith(component.prefix):
                return component
        raise KeyError(key)


def layer_families(keys: Iterable[str], limit: int = 6) -> list[str]:
    """Most common modules with block indices folded: ``blocks.N.attn.qkv (x24)``."""
    modules = {re.sub(r"\.(?:weight|bias)$", "", k) for k in keys}
    counts = Counter(re.sub(r"\.\d+(?=\.|$)", ".N", m) for m in modules)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [f"{name} (x{n})" if n > 1 else name for name, n in ranked]


def split_components(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``key -> (component prefix, role the prefix implies)``; ``("", "")`` for the root."""
    out: dict[str, tuple[str, str]] = {}
    for key in keys:
        out[key] = ("", "")
        for pattern, role in _PREFIXES:
            m = pattern.match(key)
            if m:
                out[key] = (m.group(0), role)
                break
    return out


def detect(infos: Mapping[str, TensorInfo]) -> Detection:
    """Recognise every component of a file from its header (names and shapes only)."""
    groups: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    for key, where in split_components(infos).items():
        prefix, _ = where
        groups.setdefault(where, {})[key[len(prefix) :]] = infos[key]
    components = [_identify(prefix, role, keys) for (prefix, role), keys in groups.items()]
    # Longest prefix first so that component_for picks the most specific one; root last.
    components.sort(key=lambda c: -len(c.prefix))
    return Detection(tuple(components))


def _identify(prefix: str, prefix_role: str, keys: Mapping[str, TensorInfo]) -> Component:
    full_keys = tuple(prefix + k for k in keys)
    if prefix_role == VAE:
        return Component(prefix, VAE, "vae", "VAE / vocoder", "vae", (full_keys[0],), full_keys)
    allowed = _ROLES_UNDER[prefix_role]
    for sig in SIGNATURES:
        if sig.role not in allowed:
            continue
        evidence = sig.evidence(keys)
        if evidence is not None:
            return Component(
                prefix,
                sig.role,
                sig.arch,
                sig.label,
                sig.preset,
                tuple(prefix + e for e in evidence),
                full_keys,
                sig.also_fits,
            )
    return Component(prefix, prefix_role or UNKNOWN, None, "unrecognised", "base", (), full_keys)
