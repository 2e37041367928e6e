"""Packaging and layering rules: cheap import, no generic top-level modules, one-way imports."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN = {
    # quant_core never imports ComfyUI (nor the pack's ComfyUI-facing code).
    "quant_core": {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes"},
    # kernels import torch and triton only (and the standard library).
    "kernels": {"comfy", "comfy_api", "folder_paths", "server", "safetensors"},
}


def test_import_is_cheap_and_needs_no_comfyui(tmp_path: Path) -> None:
    code = (
        "import sys, time; t = time.perf_counter();"
        "import comfyui_quantizer, comfyui_quantizer.quant_core, comfyui_quantizer.kernels,"
        " comfyui_quantizer.nodes, comfyui_quantizer.cli;"
        "import torch;"
        "assert 'triton' not in sys.modules, 'triton imported at import time';"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import time';"
        "assert 'comfy' not in sys.modules;"
        "print(time.perf_counter() - t)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_no_generic_top_level_module_is_installed(tmp_path: Path) -> None:
    # From a neutral folder, only the mapped package name resolves.
    code = (
        "import importlib.util as u;"
        "print([n for n in ('nodes', 'kernels', 'quant_core', 'cli', 'demo', 'bench')"
        " if u.find_spec(n) is not None])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    dist = importlib.metadata.distribution("comfyui-quantizer")
    assert "comfy-quantize" in {
        ep.name for ep in dist.entry_points if ep.group == "console_scripts"
    }


def _imports(path: Path) -> set[str]:
    """Absolute top-level module names imported by a source file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IN))
def test_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = _imports(path) & FORBIDDEN_IN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_requirements_never_list_torch() -> None:
    lines = [
        line for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower() for line in lines}
    assert not names & {"torch", "torchvision", "torchaudio"}
