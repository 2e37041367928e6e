"""Headless Chromium on the real ComfyUI frontend: the extension loads cleanly, the example
workflow runs from the page, and the Quantize node shows the per-layer table and summary.

Needs Debian's ``chromium`` and Playwright (``pip install playwright``); both are for this test
only (never CI dependencies), and the test is skipped, saying why, when either is missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from .harness import REPO, ComfyServer

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = REPO / "example_workflows" / "quantize_model.json"
EXTENSION = "comfyui_quantizer.LiveView"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright not installed (pip)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing (apt-get chromium)"),
]


def example_model_name() -> str:
    """The file the example workflow's loader points at (``diffusion_models/<name>``)."""
    workflow = json.loads(EXAMPLE.read_text())
    load = next(n for n in workflow["nodes"] if n["type"] == "QuantizerLoadModel")
    folder, _, name = load["widgets_values"][0].partition("/")
    assert folder == "diffusion_models"
    return name


@pytest.fixture(scope="module")
def page_run(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Open the page, load the example workflow, queue it, and read the node's DOM."""
    assert sync_playwright is not None
    folder = tmp_path_factory.mktemp("browser")
    console: list[dict[str, str]] = []
    with ComfyServer() as server, sync_playwright() as pw:
        # The example runs as shipped: the tiny Flux stands in for the model it names.
        shutil.copy(tiny_flux, server.folder("diffusion_models") / example_model_name())
        # Playwright gives the browser a fresh temporary profile.
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on(
                "console",
                lambda m: console.append(
                    {"type": m.type, "text": m.text, "url": m.location.get("url", "")}
                ),
            )
            page.on("pageerror", lambda e: console.append({"type": "pageerror", "text": str(e)}))
            page.goto(server.url)
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph", timeout=60_000)
            page.wait_for_timeout(4_000)  # the frontend finishes setting up, then a dialog
            page.keyboard.press("Escape")
            extensions = page.evaluate(
                "() => window.comfyAPI.app.app.extensions.map((e) => e.name)"
            )
            page.evaluate(
                "async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }",
                json.loads(EXAMPLE.read_text()),
            )
            page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
            page.wait_for_selector(".cq-summary:has-text('layers quantized')", timeout=120_000)
            shot = folder / "quantize_node.png"
            page.screenshot(path=str(shot))
            dom = page.evaluate(
                """() => {
                const view = document.querySelector('.cq-view');
                return {
                  status: view.querySelector('.cq-status').textContent,
                  header: [...view.querySelectorAll('thead th')].map((th) => th.textContent),
                  rows: [...view.querySelectorAll('tbody tr')].map(
                    (tr) => [...tr.children].map((td) => td.textContent)),
                  summary: view.querySelector('.cq-summary').textContent,
                  stock: view.querySelector('.cq-summary').dataset.stockLoadable,
                  visible: view.getBoundingClientRect().height > 100,
                };
            }"""
            )
            history = server.get("/history")
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    return {"extensions": extensions, "dom": dom, "console": console, "history": history,
            "shot": shot}  # fmt: skip


def test_the_extension_loads_without_console_errors(page_run: dict[str, Any]) -> None:
    assert EXTENSION in page_run["extensions"]
    console = page_run["console"]
    assert not [m for m in console if m["type"] == "pageerror"], console
    ours = [
        m for m in console
        if m["type"] in ("error", "warning")
        and ("quantizer" in m["text"].lower() or "quantizer" in m.get("url", "").lower())
    ]  # fmt: skip
    assert not ours, ours
    # A custom event without a registered listener is reported as "Unhandled message".
    assert not [m for m in console if "comfyui_quantizer." in m["text"]], console


def test_after_a_run_the_node_shows_the_layer_table_and_summary(page_run: dict[str, Any]) -> None:
    dom = page_run["dom"]
    (run,) = page_run["history"].values()
    assert run["status"]["status_str"] == "success"
    quantize_id = next(
        i for i, n in run["prompt"][2].items() if n["class_type"] == "QuantizerQuantize"
    )
    report = run["outputs"][quantize_id]["comfyui_quantizer"][0]
    assert dom["visible"] and dom["status"].startswith("done in")
    assert dom["header"] == ["layer", "format", "SQNR dB", "ms"]
    assert [r[0] for r in dom["rows"]] == [row["layer"] for row in report["rows"]]
    assert len(dom["rows"]) == report["quantized_layers"] == 26  # the flux1 preset keeps 10
    for cells, row in zip(dom["rows"], report["rows"], strict=True):
        assert cells[1] == row["format"] == "fp8/tensor"
        assert cells[2] == f"{row['weight_sqnr_db']:.2f} w"
    assert f"flux1-dev: {report['quantized_layers']} layers quantized" in dom["summary"]
    assert "loads in stock ComfyUI" in dom["summary"] and dom["stock"] == "true"
    assert page_run["shot"].stat().st_size > 10_000
