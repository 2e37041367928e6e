"""Regenerate ``example_workflows/quantize_model.json`` with the real frontend.

The workflow is built in the page (LiteGraph nodes, links, a how-to note) and serialized by the
frontend itself, so it always matches the current node definitions. Run after changing widgets:

    COMFYUI_DIR=... COMFYUI_PYTHON=... .venv/bin/python -m tests.e2e.make_example_workflow

Needs Playwright and Debian's chromium, like the browser test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .harness import REPO, ComfyServer, make_tiny_flux

OUT = REPO / "example_workflows" / "quantize_model.json"
MODEL = "flux1-dev.safetensors"  # what the loader points at; users pick their own
NOTE = """Quantize a model to 8 bits (FP8 E4M3 or INT8) for ComfyUI.

1. Load Model for Quantization: pick the file (diffusion_models, checkpoints or text_encoders). \
Nothing is loaded yet.
2. Quantize Model: preset auto detects the architecture and keeps its sensitive layers in high \
precision. The first three formats (fp8 tensor, int8 row, int8 tensor) load in any ComfyUI; \
formats marked [needs pack] load only where this pack is installed. The node shows every layer \
as it is done and a summary at the end.
3. Save Quantized Model: writes <prefix>_00001_.safetensors into the model folder (never \
overwrites). It shows up in UNETLoader / CLIPLoader at once.

A/B test: connect Quantize's MODEL output to a KSampler next to one fed by the original model \
(same seed). Instead of a file, Quantize also takes a MODEL (its LoRAs are baked in) or a CLIP \
holding a T5 / LLM text encoder."""

BUILD = """async (note) => {
  const app = window.comfyAPI.app.app;
  const LG = window.LiteGraph;
  app.graph.clear();
  const add = (type, pos, size) => {
    const node = LG.createNode(type);
    node.pos = pos;
    app.graph.add(node);
    if (size) node.setSize(size);
    return node;
  };
  const load = add("QuantizerLoadModel", [40, 120], [340, 60]);
  const quantize = add("QuantizerQuantize", [420, 120]);
  const save = add("QuantizerSave", [990, 120], [320, 110]);
  save.widgets.find((w) => w.name === "filename_prefix").value = "quantized/flux1-dev_fp8";
  const help = add("Note", [40, 300], [340, 420]);
  help.title = "How to use";
  help.widgets[0].value = note;
  load.connect(0, quantize, 0);
  quantize.connect(0, save, 0);
  return app.graph.serialize();
}"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, ComfyServer() as server, sync_playwright() as pw:
        flux = make_tiny_flux(Path(tmp) / "tiny_flux.safetensors")
        shutil.copy(flux, server.folder("diffusion_models") / MODEL)
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph", timeout=60_000)
        page.wait_for_timeout(4_000)
        workflow = page.evaluate(BUILD, NOTE)
        browser.close()
    load = next(n for n in workflow["nodes"] if n["type"] == "QuantizerLoadModel")
    assert load["widgets_values"] == [f"diffusion_models/{MODEL}"], load["widgets_values"]
    OUT.write_text(json.dumps(workflow, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
