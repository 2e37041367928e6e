"""Write a random Qwen3-0.6B text encoder built by ComfyUI's own class (about 600M weights).

Run with ComfyUI's Python (``$COMFYUI_PYTHON make_qwen3_06b.py OUT.safetensors [--seed N]``):
key names and shapes are those ComfyUI's CLIPLoader detects as Qwen3-0.6B (the Anima text
encoder), a family whose loader passes quantization on (``llama_detect``). Norm scales are 1,
other weights small Gaussians; bf16.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    comfy_dir = os.environ["COMFYUI_DIR"]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ops
    import torch
    from comfy.text_encoders.llama import Qwen3_06B
    from safetensors.torch import save_file

    model = Qwen3_06B({}, dtype=torch.float32, device="meta", operations=comfy.ops.manual_cast)
    g = torch.Generator().manual_seed(args.seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if "norm" in name:
            value = torch.ones(tensor.shape)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn(tensor.shape, generator=g)
        else:
            value = torch.randn(tensor.shape, generator=g) / tensor.shape[-1] ** 0.5
        state[name] = value.to(torch.bfloat16).contiguous()
    save_file(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors")


if __name__ == "__main__":
    main()
