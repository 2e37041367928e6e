"""Every layer we quantize loads in stock ComfyUI as a quantized op holding our values.

A layer that ComfyUI's model class builds without ``operations`` (or whose key it renames
without its scale) would load its 8-bit codes as plain weights, silently wrong. For each
architecture ComfyUI's own classes can build small (Flux, WAN 2.1, Hunyuan Video, whose
loader renames keys), the CLI converts a random model with the detected preset into each stock
format, ComfyUI's ``load_diffusion_model`` loads it, and every ``.comfy_quant`` layer must be a
quantized op whose dequantized weight equals codes x scale from the file (float64).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from .harness import cli, make_random_model, user_env

_CHECK = textwrap.dedent(
    """
    import json, os, sys
    paths = json.loads(sys.argv[1])
    comfy_dir = os.environ["COMFYUI_DIR"]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.sd
    from safetensors.torch import load_file

    out = {}
    for name, path in paths.items():
        sd = load_file(path)
        layers = [k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")]
        modules = dict(comfy.sd.load_diffusion_model(path).model.diffusion_model.named_modules())
        plain, missing, worst = [], [], 0.0
        for layer in layers:
            module = modules.get(layer)
            if module is None:
                missing.append(layer)
                continue
            if not getattr(module, "quant_format", None) or not hasattr(module.weight, "_qdata"):
                plain.append(layer)
                continue
            ref = sd[layer + ".weight"].double() * sd[layer + ".weight_scale"].double()
            got = module.weight.dequantize().double()
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        out[name] = {"layers": len(layers), "plain": plain, "missing": missing, "worst": worst}
    print("RESULT " + json.dumps(out))
    """
)

FORMATS = {"fp8 tensor": [], "int8 row": ["--int8", "--scaling-mode", "row"]}


@pytest.mark.parametrize(
    ("arch", "detected"),
    [("flux", "flux1-dev"), ("wan", "wan"), ("hunyuan-video", "hunyuan-video")],
)
def test_every_quantized_layer_loads_as_a_quantized_op(
    arch: str, detected: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if arch == "flux":  # the session's tiny Flux (conftest.py), the same file
        model = request.getfixturevalue("tiny_flux")
    else:
        model = make_random_model(arch, tmp_path / f"{arch}.safetensors")
    paths = {}
    for fmt, flags in FORMATS.items():
        out = tmp_path / f"{arch}_{fmt.replace(' ', '_')}.safetensors"
        done = cli("-i", str(model), "-o", str(out), *flags)
        assert done.returncode == 0, done.stderr
        assert f"architecture: {detected}" in done.stdout
        paths[fmt] = str(out)
    checked = subprocess.run(
        [os.environ["COMFYUI_PYTHON"], "-c", _CHECK, json.dumps(paths)],
        capture_output=True, text=True, timeout=600, env=user_env(),
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr[-3000:]
    line = next(x for x in checked.stdout.splitlines() if x.startswith("RESULT "))
    for fmt, r in json.loads(line.removeprefix("RESULT ")).items():
        print(f"{arch} {fmt}: {r['layers']} layers, worst deviation {r['worst']:.1e}")
        assert r["layers"] > 10, (fmt, r)
        assert r["missing"] == [] and r["plain"] == [], (fmt, r)
        assert r["worst"] < 1e-6, (fmt, r)
