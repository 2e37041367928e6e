"""Write a random T5-base text encoder built by ComfyUI's own T5 class (about 110M weights).

Run with ComfyUI's Python (``$COMFYUI_PYTHON make_t5_base.py OUT.safetensors [--seed N]``):
key names and shapes are those of a T5-base encoder file, which ComfyUI's CLIPLoader detects
and loads (type ``stable_audio``). Layer-norm scales are 1, other weights small Gaussians; bf16.
"""

from __future__ import annotations

import argparse
import json
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
    from comfy.text_encoders.t5 import T5
    from safetensors.torch import save_file

    with open(os.path.join(comfy_dir, "comfy", "text_encoders", "t5_config_base.json")) as f:
        config = json.load(f)
    model = T5(config, dtype=torch.float32, device="meta", operations=comfy.ops.manual_cast)
    g = torch.Generator().manual_seed(args.seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if "layer_norm" in name:
            value = torch.ones(tensor.shape)
        elif name == "shared.weight":
            value = torch.randn(tensor.shape, generator=g)
        else:
            value = torch.randn(tensor.shape, generator=g) / tensor.shape[-1] ** 0.5
        state[name] = value.to(torch.bfloat16).contiguous()
    save_file(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors")


if __name__ == "__main__":
    main()
