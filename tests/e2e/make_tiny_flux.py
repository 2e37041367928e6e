"""Write a tiny random Flux.1 checkpoint built by ComfyUI's own model class.

Run with ComfyUI's Python (``$COMFYUI_PYTHON make_tiny_flux.py OUT.safetensors [--seed N]``) so
that key names and shapes are exactly what ComfyUI's loader expects. Hidden size 128 (detection
needs a multiple of 128), 2 double + 2 single blocks, axes_dim [16, 56, 56], context 64, vec 32,
guidance embedding; QK-norm scales are 1, other weights small Gaussians; stored as bf16.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
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
    import comfy.ops
    import torch
    from comfy.ldm.flux.model import Flux
    from safetensors.torch import save_file

    heads = args.hidden // 128  # pe_dim = sum(axes_dim) = 128
    model = Flux(
        in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=args.hidden,
        mlp_ratio=4.0, num_heads=heads, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
    )  # fmt: skip
    g = torch.Generator().manual_seed(args.seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if "norm" in name and tensor.dim() == 1:  # RMSNorm scales of the QK-norms
            value = torch.ones(tensor.shape)
        elif name.endswith(".bias"):
            value = torch.randn(tensor.shape, generator=g) * 0.01
        else:
            fan_in = tensor.shape[-1] if tensor.dim() > 1 else 1
            value = torch.randn(tensor.shape, generator=g) / fan_in**0.5
        state[name] = value.to(torch.bfloat16).contiguous()
    save_file(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors")


if __name__ == "__main__":
    main()
