"""Write a random model built by ComfyUI's own classes, so that key names and shapes are exactly
what ComfyUI's loaders expect. Run with ComfyUI's Python:

    $COMFYUI_PYTHON make_random_model.py KIND OUT.safetensors [--seed N] [--hidden H]

KIND:
  flux       a tiny Flux.1: hidden ``--hidden`` (128; detection needs a multiple of 128), 2 double
             + 2 single blocks, axes_dim [16, 56, 56], context 64, vec 32, guidance embedding;
  t5-base    a T5-base text encoder (about 110M weights), which CLIPLoader detects (type
             ``stable_audio``) and whose loader ignores quantization;
  qwen3-06b  a Qwen3-0.6B text encoder (about 600M weights, the Anima encoder), a family whose
             loader passes quantization on (``llama_detect``);
  wan, hunyuan-video  small WAN 2.1 (dim 128, 2 layers) and Hunyuan Video (hidden 128, 2 + 2
             blocks) diffusion models that ComfyUI's detection sizes back from their shapes.
Weights: norm scales 1, biases ~0.01, embeddings N(0, 1), others N(0, 1/fan_in); stored as bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build(kind: str, hidden: int):  # type: ignore[no-untyped-def]
    import comfy.ops
    import torch

    if kind == "flux":
        from comfy.ldm.flux.model import Flux

        return Flux(
            in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=hidden,
            mlp_ratio=4.0, num_heads=hidden // 128, depth=2, depth_single_blocks=2,
            axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
            txt_ids_dims=[], dtype=torch.float32, device="cpu",
            operations=comfy.ops.disable_weight_init,
        )  # fmt: skip
    if kind == "t5-base":
        from comfy.text_encoders.t5 import T5

        path = os.path.join("comfy", "text_encoders", "t5_config_base.json")
        with open(path) as f:
            config = json.load(f)
        return T5(config, dtype=torch.float32, device="meta", operations=comfy.ops.manual_cast)
    if kind == "qwen3-06b":
        from comfy.text_encoders.llama import Qwen3_06B

        return Qwen3_06B({}, dtype=torch.float32, device="meta", operations=comfy.ops.manual_cast)
    # Small diffusion models in the sizes ComfyUI's detection derives back from the shapes
    # (one 128-wide attention head each).
    if kind == "wan":
        from comfy.ldm.wan.model import WanModel

        return WanModel(
            dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64, freq_dim=256,
            dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
        )  # fmt: skip
    if kind == "hunyuan-video":
        from comfy.ldm.hunyuan_video.model import HunyuanVideo

        return HunyuanVideo(
            in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128,
            mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56],
            theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False,
            meanflow=False, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False,
            dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
        )  # fmt: skip
    raise SystemExit(f"unknown kind {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "kind",
        choices=["flux", "t5-base", "qwen3-06b", "wan", "hunyuan-video"],
    )
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()

    comfy_dir = os.environ["COMFYUI_DIR"]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    model = build(args.kind, args.hidden)
    g = torch.Generator().manual_seed(args.seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if "norm" in name and tensor.dim() == 1:
            value = torch.ones(tensor.shape)
        elif name.endswith(".bias"):
            value = torch.randn(tensor.shape, generator=g) * 0.01
        elif name in ("shared.weight", "model.embed_tokens.weight"):
            value = torch.randn(tensor.shape, generator=g)
        else:
            fan_in = tensor.shape[-1] if tensor.dim() > 1 else 1
            value = torch.randn(tensor.shape, generator=g) / fan_in**0.5
        state[name] = value.to(torch.bfloat16).contiguous()
    save_file(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors")


if __name__ == "__main__":
    main()
