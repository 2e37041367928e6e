"""The nodes' layering: logic modules never import ComfyUI, and quant_core is used through its
package API (plus what the CLI also reads: dtype names, presets, learned-rounding choices and
the calibration recorder)."""

from __future__ import annotations

import ast
from pathlib import Path

NODES = Path(__file__).resolve().parents[2] / "nodes"
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server"}
# Only these modules talk to ComfyUI; the others are tested in CI without it.
COMFYUI_FACING = {"comfy_io.py", "quantizer_nodes.py", "calibrate_node.py", "extension.py"}
LOGIC = {"options.py", "saving.py", "sources.py", "result.py", "events.py"}
# (comfy_runtime.py, layouts.py, layout_math.py belong to the runtime: its own rules.)
MINE = COMFYUI_FACING | LOGIC
# ``from ..quant_core[.x] import ...``: the package, and the tables/recorder the CLI also uses.
QUANT_CORE_MODULES = {"", "dtypes", "presets", "learned", "calibration"}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(absolute top-level modules, quant_core submodules) imported by ``path``."""
    absolute: set[str] = set()
    core: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0:
                absolute.add(module.split(".")[0])
            elif node.level == 2 and module.split(".")[0] == "quant_core":
                core.add(module.partition(".")[2])
    return absolute, core


def test_only_the_comfyui_facing_modules_import_comfyui() -> None:
    assert {p.name for p in NODES.glob("*.py")} >= MINE
    for name in sorted(LOGIC):
        absolute, _ = imports(NODES / name)
        assert not absolute & COMFYUI, f"{name} imports {sorted(absolute & COMFYUI)}"


def test_quant_core_is_used_through_its_package_api() -> None:
    for path in sorted(NODES / name for name in MINE):
        _, core = imports(path)
        assert core <= QUANT_CORE_MODULES, f"{path.name} imports quant_core.{core}"
