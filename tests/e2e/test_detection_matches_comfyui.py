"""Our architecture detection agrees with ComfyUI's own on the same tiny files.

Each tiny model of ``tests/tiny_archs.py`` is written to disk and handed to ComfyUI's
``model_detection.detect_unet_config`` (diffusion models, after ComfyUI's own prefix
handling) or ``sd.detect_te_model`` (text encoders), run by ComfyUI's Python: an independent
reference for the key names and shapes our detection and test files rely on.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from comfyui_quantizer.quant_core import SafetensorsSource
from comfyui_quantizer.quant_core.detect import detect

from .harness import user_env

# our architecture -> what ComfyUI's detection must say (image_model plus telling fields)
DIFFUSION = {
    "flux1-dev": {"image_model": "flux", "guidance_embed": True},
    "flux1-schnell": {"image_model": "flux", "guidance_embed": False},
    "flux2": {"image_model": "flux2"},
    "chroma": {"image_model": "chroma"},
    "chroma-radiance": {"image_model": "chroma_radiance"},
    "wan": {"image_model": "wan2.1", "model_type": "t2v"},
    "wan-i2v": {"image_model": "wan2.1", "model_type": "i2v"},
    "hunyuan-video": {"image_model": "hunyuan_video"},
    "qwen-image": {"image_model": "qwen_image"},
    "z-image": {"image_model": "lumina2", "z_image_modulation": True},
    "lumina2": {"image_model": "lumina2", "z_image_modulation": None},
    "ltxv2": {"image_model": "ltxav"},
    "krea2": {"image_model": "krea2"},
    "anima": {"image_model": "anima"},
}
TEXT_ENCODERS = {
    "clip-l": "CLIP_L",
    "clip-g": "CLIP_G",
    # T5: only T5_XXL and T5_XXL_OLD reach a loader that honours quantization (t5xxl_detect).
    "t5-xxl": "T5_XXL",
    "t5-xxl-old": "T5_XXL_OLD",
    "t5-xl": "T5_XL",
    "t5-base": "T5_BASE",
    "t5-gemma": "T5_GEMMA",
}

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    comfy_dir = os.environ["COMFYUI_DIR"]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    paths = json.loads(sys.argv[1])
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_detection as md
    import comfy.sd
    import comfy.utils

    out = {}
    for name, (kind, path) in paths.items():
        sd = comfy.utils.load_torch_file(path)
        if kind == "te":
            out[name] = str(comfy.sd.detect_te_model(sd))
            continue
        prefix = md.unet_prefix_from_state_dict(sd)  # as load_diffusion_model_state_dict does
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        config = md.detect_unet_config(stripped or sd, "")
        out[name] = {k: v for k, v in (config or {}).items() if isinstance(v, (str, bool))}
    print("RESULT " + json.dumps(out))
    """
)


def test_detection_agrees_with_comfyui(
    write_model: Callable[..., Path], tiny_archs: ModuleType
) -> None:
    paths = {}
    ours = {}
    for name in [*DIFFUSION, *TEXT_ENCODERS]:
        path = write_model(tiny_archs.BUILDERS[name](), name=f"{name}.safetensors")
        paths[name] = ("te" if name in TEXT_ENCODERS else "dm", str(path))
        with SafetensorsSource(path) as src:
            ours[name] = detect(src.tensors()).components[0].arch
    done = subprocess.run(
        [os.environ["COMFYUI_PYTHON"], "-c", _SCRIPT, json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=300,
        env=user_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    theirs = json.loads(line.removeprefix("RESULT "))
    for name, expected in DIFFUSION.items():
        assert ours[name] == name
        got = theirs[name]
        for key, value in expected.items():
            assert got.get(key) == value, (name, key, got)
    for name, te in TEXT_ENCODERS.items():
        assert ours[name] == name
        assert theirs[name].endswith(te), (name, theirs[name])
