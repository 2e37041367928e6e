"""Which tensors a preset keeps, drops or casts: the rules as data, one table.

A :class:`Preset` lists, for one model family, regex patterns matched (``re.search``) against a
tensor key *relative to its component prefix* (``model.diffusion_model.img_in.weight`` is seen as
``img_in.weight``). Every pattern carries the reason that is shown in the plan.

Precedence, first that applies wins (``rules.py`` implements it, tests pin it):

1. preset ``drop``                                            -> drop the key from the output
2. structure: not floating point, not a ``.weight``, not 2-D  -> keep (no rule can override)
3. ``BASE.protect`` + preset ``protect`` (norms, embeddings, keys the loader reads shapes or
   dtypes from, whole VAE/CLIP components)                    -> keep (no rule can override)
4. layer-config rule, first match in file order               -> its format, or keep (``skip``)
5. ``--custom-layers``                                        -> the custom format
6. ``--exclude-layers``                                       -> keep
7. ``BASE.keep`` + preset ``keep`` + ``edge_blocks``            -> keep (precision-sensitive)
8. ``--heur`` (tiny or extreme aspect ratio)                  -> keep
9. layer-config ``_default`` or the primary format            -> quantize

A chosen format's 8-bit matmul needs both sides of the weight to be multiples of 16; a layer
that is not stays, or with ``--fallback`` is stored weight-only in that format. (Block scaling
takes any such shape: blocks that do not tile it get a padded scale grid.)
``dtype`` overrides apply to every tensor that stays (whatever the reason) before
``--output-dtype``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Dtype override value: write the tensor exactly as stored in the source.
SOURCE_DTYPE = "source"
ROLES = ("diffusion", "text_encoder", "vae", "clip", "any")


@dataclass(frozen=True)
class Pattern:
    """A key regex (``re.search`` on the component-relative key) and why it matters."""

    regex: str
    why: str

    def __post_init__(self) -> None:
        re.compile(self.regex)  # a bad table entry fails at import, not mid-conversion


@dataclass(frozen=True)
class DtypeOverride:
    """Tensors matching ``regex`` that stay are written as ``dtype`` (or their source dtype)."""

    regex: str
    dtype: str
    why: str


@dataclass(frozen=True)
class EdgeBlocks:
    """Keep the first ``first`` and last ``last`` blocks of ``<prefix>.<i>.`` (count from keys)."""

    prefix: str
    first: int
    last: int
    why: str


@dataclass(frozen=True)
class Preset:
    """The rules of one model family (see the module docstring for precedence)."""

    name: str
    role: str
    summary: str
    flags: tuple[str, ...] = ()
    protect: tuple[Pattern, ...] = ()
    keep: tuple[Pattern, ...] = ()
    drop: tuple[Pattern, ...] = ()
    dtype: tuple[DtypeOverride, ...] = ()
    edge_blocks: tuple[EdgeBlocks, ...] = ()
    selectable: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"preset {self.name}: unknown role {self.role!r}")


def seg(*names: str) -> str:
    """Regex for dotted module paths as whole segments: ``seg("img_in")`` matches ``img_in.weight``
    and ``a.img_in.weight`` but not ``img_in_patch.weight``."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"(?:^|\.)(?:{alternatives})(?:\.|$)"


def start(*names: str) -> str:
    """Regex for keys that begin with one of these dotted paths."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"^(?:{alternatives})(?:\.|$)"


SHAPE = "the loader reads this key's shape to build the model"
EMBEDDER = "small embedding MLP feeding every block's modulation; tiny share of the weights"
FINAL = "output projection onto the latent; errors land directly in the prediction"

# Applies to every component under every preset and every format.
BASE = Preset(
    name="base",
    role="any",
    summary="only the base rules: norms, biases, embeddings, 1-D tensors and lm_head stay",
    protect=(
        Pattern(
            r"(?i)(?:^|\.)[a-z0-9_]*norm[a-z0-9_]*(?:\.|$)",
            "normalisation weights scale whole activations",
        ),
        Pattern(r"(?:^|\.)(?:ln|ln_\w+|\w+_ln)\d*(?:\.|$)", "layer norm (ln_*)"),
        Pattern(
            r"(?:^|\.)(?:\w*_)?(?:embeddings?|embed_tokens|wte|wpe|shared)\.weight$",
            "embedding lookup table: rows are read, never multiplied as a matrix",
        ),
    ),
    keep=(
        Pattern(seg("lm_head"), "vocabulary head: outlier-heavy, run once per token"),
        Pattern(seg("patch_embed", "patch_embedding"), "patch embedding (input projection)"),
    ),
    dtype=(
        DtypeOverride(
            r"^__\w+__$", SOURCE_DTYPE, "marker tensor: the loader only checks that it exists"
        ),
    ),
)

_FLUX_IO = (
    Pattern(seg("img_in"), SHAPE + " (in_channels, hidden_size)"),
    Pattern(seg("txt_in"), SHAPE + " (context_in_dim)"),
)


def _extend(base: Preset, *, name: str, summary: str, flags: tuple[str, ...],
            keep: tuple[Pattern, ...]) -> Preset:  # fmt: skip
    return Preset(
        name=name,
        role=base.role,
        summary=summary,
        flags=flags,
        protect=base.protect,
        keep=base.keep + keep,
        drop=base.drop,
        dtype=base.dtype,
        edge_blocks=base.edge_blocks,
    )


_ZIMAGE = Preset(
    name="zimage",
    role="diffusion",
    summary="Z-Image: x/cap/t embedders, adaLN modulation, final layer",
    flags=("--zimage",),
    protect=(
        Pattern(seg("cap_embedder.1"), SHAPE + " (dim, cap_feat_dim)"),
        Pattern(seg("siglip_embedder.0"), SHAPE + " (siglip_feat_dim)"),
    ),
    keep=(
        Pattern(seg("x_embedder"), "patch input projection of the latent"),
        Pattern(
            seg("cap_embedder", "t_embedder", "clip_text_pooled_proj", "time_text_embed"),
            EMBEDDER,
        ),
        Pattern(seg("adaLN_modulation"), "adaLN modulation: scales/shifts whole activations"),
        Pattern(seg("final_layer"), FINAL),
    ),
)

_ZIMAGE_REFINER = _extend(
    _ZIMAGE,
    name="zimage_refiner",
    summary="Z-Image with its context/noise refiners kept too",
    flags=("--zimage_refiner", "--zimage-refiner"),
    keep=(
        Pattern(
            seg("context_refiner", "noise_refiner"),
            "refiner blocks before the main stack (kept by --zimage_refiner)",
        ),
    ),
)

_LLM = Preset(
    name="llm",
    role="text_encoder",
    summary="Llama/Qwen/Gemma-style text encoders: vision tower input and merger stay",
    flags=("--llm",),
    keep=(
        Pattern(
            seg("visual.patch_embed", "visual.merger", "visual.blocks.0"),
            "vision tower input, first block and merger (Qwen-VL)",
        ),
        Pattern(seg("multi_modal_projector"), "multimodal projector into the LLM"),
    ),
    dtype=(
        DtypeOverride(
            r"^model\.(?:norm|layers\.0\.input_layernorm)\.weight$",
            SOURCE_DTYPE,
            "the loader reads this tensor's dtype to choose the encoder's compute dtype",
        ),
    ),
)

_MISTRAL = _extend(
    _LLM,
    name="mistral",
    summary="Mistral-style text encoders (Flux.2): llm rules + vision patch conv",
    flags=("--mistral",),
    keep=(Pattern(seg("patch_conv", "vision_tower.ln_pre"), "vision tower input"),),
)

PRESETS: tuple[Preset, ...] = (
    BASE,
    # --- diffusion models -------------------------------------------------------------------
    Preset(
        name="flux1",
        role="diffusion",
        summary="Flux.1 dev/schnell: img_in/txt_in/vector_in, time/guidance embedders, final layer",
        flags=("--flux1",),
        protect=(*_FLUX_IO, Pattern(seg("vector_in.in_layer"), SHAPE + " (vec_in_dim)")),
        keep=(
            Pattern(seg("time_in", "guidance_in", "vector_in"), EMBEDDER),
            Pattern(seg("final_layer"), FINAL),
        ),
    ),
    Preset(
        name="distillation_large",
        role="diffusion",
        summary="Chroma (and Flux.1): distilled_guidance_layer, final_layer, img_in, txt_in",
        flags=("--distillation_large", "--distillation-large"),
        protect=_FLUX_IO,
        keep=(
            Pattern(
                seg("distilled_guidance_layer"),
                "the approximator that produces every block's modulation from the timestep",
            ),
            Pattern(seg("final_layer"), FINAL),
        ),
    ),
    Preset(
        name="nerf_large",
        role="diffusion",
        summary="Chroma Radiance: NeRF head, distilled_guidance_layer, txt_in",
        flags=("--nerf_large", "--nerf-large"),
        protect=(
            Pattern(seg("txt_in"), SHAPE + " (context_in_dim)"),
            Pattern(seg("img_in_patch"), SHAPE + " (patch size)"),
        ),
        keep=(
            Pattern(
                seg("distilled_guidance_layer"),
                "the approximator that produces every block's modulation from the timestep",
            ),
            Pattern(
                seg("nerf_blocks"),
                "hypernetwork: generates the per-patch pixel MLP weights, errors multiply",
            ),
            Pattern(seg("nerf_image_embedder"), "pixel embedder of the NeRF head"),
            Pattern(seg("nerf_final_layer", "nerf_final_layer_conv", "final_layer"), FINAL),
        ),
        dtype=(
            DtypeOverride(
                seg("nerf_image_embedder"),
                SOURCE_DTYPE,
                "the loader runs the NeRF embedder in float32 (nerf_embedder_dtype)",
            ),
        ),
    ),
    Preset(
        name="flux2",
        role="diffusion",
        summary="Flux.2: global stream modulations, time/guidance embedders, final, img/txt_in",
        flags=("--flux2",),
        protect=_FLUX_IO,
        keep=(
            Pattern(
                seg(
                    "double_stream_modulation_img",
                    "double_stream_modulation_txt",
                    "single_stream_modulation",
                ),
                "global modulation shared by every block",
            ),
            Pattern(seg("time_in", "guidance_in"), EMBEDDER),
            Pattern(seg("final_layer"), FINAL),
        ),
    ),
    Preset(
        name="wan",
        role="diffusion",
        summary="WAN 2.x: text/time embeddings, time projection, head, image/audio adapters",
        flags=("--wan",),
        protect=(
            Pattern(seg("head.head"), SHAPE + " (out_dim)"),
            Pattern(start("blocks.0.ffn.0"), SHAPE + " (ffn_dim)"),
        ),
        keep=(
            Pattern(
                seg("text_embedding", "time_embedding", "time_projection"),
                "text/time embedding MLPs feeding every block",
            ),
            Pattern(seg("img_emb"), "image embedding MLP (i2v conditioning)"),
            Pattern(seg("head"), FINAL),
            Pattern(
                seg(
                    "face_adapter",
                    "face_encoder",
                    "motion_encoder",
                    "audio_injector",
                    "casual_audio_encoder",
                    "frame_packer",
                    "cond_encoder",
                    "control_adapter",
                    "ref_conv",
                ),
                "conditioning adapter of a WAN variant: small and input-facing",
            ),
        ),
    ),
    Preset(
        name="hunyuan",
        role="diffusion",
        summary="Hunyuan Video: embedders, token refiner, vision_in, final layer",
        flags=("--hunyuan",),
        protect=(
            Pattern(seg("txt_in.input_embedder"), SHAPE + " (context_in_dim)"),
            Pattern(seg("final_layer.linear"), SHAPE + " (out_channels)"),
            Pattern(seg("vision_in.proj.0"), SHAPE + " (vision_in_dim)"),
            Pattern(seg("img_in.proj"), SHAPE + " (patch size, in_channels)"),
        ),
        keep=(
            Pattern(seg("time_in", "time_r_in", "vector_in", "guidance_in"), EMBEDDER),
            Pattern(seg("txt_in"), "token refiner: the whole text path passes through it"),
            Pattern(seg("byt5_in", "vision_in"), "glyph/vision input projection"),
            Pattern(seg("final_layer"), FINAL),
        ),
    ),
    Preset(
        name="qwen",
        role="diffusion",
        summary="Qwen-Image: time_text_embed, img_in/txt_in, norm_out/proj_out, block 0 img_mod",
        flags=("--qwen",),
        protect=(Pattern(seg("img_in"), SHAPE + " (in_channels)"),),
        keep=(
            Pattern(seg("time_text_embed"), EMBEDDER),
            Pattern(seg("txt_in"), "text input projection: the whole text path passes through it"),
            Pattern(seg("norm_out", "proj_out"), FINAL),
            Pattern(
                start("transformer_blocks.0.img_mod.1"),
                "first block's image modulation (kept by the reference tool's --qwen too)",
            ),
        ),
    ),
    _ZIMAGE,
    _ZIMAGE_REFINER,
    Preset(
        name="ltxv2",
        role="diffusion",
        summary="LTX-Video 2: adaLN tables, (audio) patchify/proj_out, connectors, edge blocks",
        flags=("--ltxv2",),
        protect=(Pattern(start("transformer_blocks.0.attn2.to_k"), SHAPE + " (head dim)"),),
        keep=(
            Pattern(
                r"(?:^|\.)\w*adaln_single(?:\.|$)",
                "adaLN-single: turns the timestep into every block's modulation",
            ),
            Pattern(
                seg("patchify_proj", "audio_patchify_proj", "proj_out", "audio_proj_out"),
                "input/output projection of the latent (video and audio)",
            ),
            Pattern(
                seg(
                    "caption_projection",
                    "audio_caption_projection",
                    "video_embeddings_connector",
                    "audio_embeddings_connector",
                    "text_embedding_projection",
                ),
                "text conditioning path (projection and connectors)",
            ),
            Pattern(seg("to_gate_logits"), "attention gate logits: small, saturating"),
        ),
        dtype=(
            DtypeOverride(
                r"(?:^|\.)\w*scale_shift_table$",
                SOURCE_DTYPE,
                "adaLN table added to the timestep embedding; keep its stored precision",
            ),
        ),
        edge_blocks=(
            EdgeBlocks(
                "transformer_blocks",
                2,
                2,
                "first/last transformer blocks carry the largest activations",
            ),
        ),
    ),
    Preset(
        name="anima",
        role="diffusion",
        summary="Anima: block 0, block 1 adaLN, final layer, llm_adapter, t/x embedders",
        flags=("--anima",),
        protect=(Pattern(seg("x_embedder.proj.1"), SHAPE + " (in_channels, model_channels)"),),
        keep=(
            Pattern(start("blocks.0"), "first block (kept by the reference tool's --anima too)"),
            Pattern(start("blocks.1.adaln_modulation"), "block 1 adaLN modulation"),
            Pattern(seg("final_layer"), FINAL),
            Pattern(seg("llm_adapter"), "LLM adapter: the whole text path passes through it"),
            Pattern(seg("t_embedder", "x_embedder"), EMBEDDER),
        ),
    ),
    Preset(
        name="krea2",
        role="diffusion",
        summary="Krea 2: first/last layers, time/text MLPs, modulation projection",
        flags=("--krea2",),
        protect=(
            Pattern(seg("first"), SHAPE + " (features, channels)"),
            Pattern(start("blocks.0.attn.wq", "blocks.0.attn.wk"), SHAPE + " (heads, kv heads)"),
            Pattern(seg("txtfusion.projector"), SHAPE + " (number of text layers)"),
        ),
        keep=(
            Pattern(seg("tmlp", "txtmlp"), "time/text embedding MLP"),
            Pattern(seg("tproj"), "modulation projection shared by every block"),
            Pattern(seg("last"), FINAL),
        ),
    ),
    # --- text encoders ----------------------------------------------------------------------
    Preset(
        name="t5xxl",
        role="text_encoder",
        summary="T5-XXL encoder: drops decoder/lm_head, keeps relative position bias",
        flags=("--t5xxl",),
        drop=(
            Pattern(start("decoder"), "T5 decoder: ComfyUI's text encoder never loads it"),
            Pattern(start("lm_head"), "T5 LM head: ComfyUI's text encoder never loads it"),
        ),
        protect=(
            Pattern(
                seg("relative_attention_bias"),
                "relative position bias table (an embedding lookup)",
            ),
        ),
        dtype=(
            DtypeOverride(
                start("encoder.final_layer_norm"),
                SOURCE_DTYPE,
                "the loader reads this tensor's dtype to choose T5's compute dtype",
            ),
        ),
    ),
    _LLM,
    _MISTRAL,
    # --- components that must stay whole (chosen by detection, not by the user) -------------
    Preset(
        name="vae",
        role="vae",
        summary="VAE / vocoder: everything stays (ComfyUI loads them without quantized layers)",
        protect=(Pattern(r".", "VAE/vocoder: ComfyUI loads it without quantized layers"),),
        selectable=False,
    ),
    Preset(
        name="clip",
        role="clip",
        summary="CLIP-L/G/H, T5 other than XXL, T5-Gemma inside a checkpoint: everything stays",
        protect=(
            Pattern(
                r".",
                "text encoder whose ComfyUI loader ignores quantization (it would load the "
                "codes silently wrong)",
            ),
        ),
        selectable=False,
    ),
)


PRESET_BY_NAME: Mapping[str, Preset] = MappingProxyType({p.name: p for p in PRESETS})
SELECTABLE = tuple(p.name for p in PRESETS if p.selectable)


def readable(regex: str) -> str:
    """A table regex as help text: the names :func:`seg`/:func:`start` built it from, else
    the regex itself (``img_in, txt_in``; ``keys starting blocks.0``; ``/^__\\w+__$/``)."""
    for builder, template in ((seg, "{}"), (start, "keys starting {}")):
        head, tail = builder("X").split("X")  # the wrapper around the names
        if regex.startswith(head) and regex.endswith(tail):
            names = regex[len(head) : len(regex) - len(tail)].split("|")
            return template.format(", ".join(n.replace("\\", "") for n in names))
    return f"/{regex}/"


def describe(p: Preset) -> list[str]:
    """Lines for ``--help-filters``: what the preset protects, keeps, drops and casts."""
    lines = []
    for title, items in (("never quantized", p.protect), ("kept", p.keep), ("dropped", p.drop)):
        lines += [f"{title}: {readable(i.regex)} ({i.why})" for i in items]
    lines += [
        f"kept: first {e.first} and last {e.last} {e.prefix}.N blocks ({e.why})"
        for e in p.edge_blocks
    ]
    lines += [f"dtype {d.dtype}: {readable(d.regex)} ({d.why})" for d in p.dtype]
    return lines
