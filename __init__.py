"""comfyui-quantizer: a ComfyUI node pack and CLI that writes 8-bit ComfyUI checkpoints.

ComfyUI imports this folder as a custom node pack; pip installs it as ``comfyui_quantizer``.
Importing it is cheap and needs no ComfyUI: nodes are only built when ComfyUI asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .nodes.extension import QuantizerExtension

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


# --- pack-only formats at ComfyUI start (issue 7; owner: runtime) -------------------------------
def _register_pack_formats() -> None:
    """Inside ComfyUI only: let its loaders read int8_blockwise and row/block-scaled FP8."""
    import sys

    if "comfy.ops" not in sys.modules:  # pip install, CLI, tests: ComfyUI is not running
        return
    from .nodes.comfy_runtime import register

    register()  # never raises; logs one line either way


_register_pack_formats()
# --- end pack-only formats -----------------------------------------------------------------------


async def comfy_entrypoint() -> QuantizerExtension:
    """ComfyUI's V3 entry point; the node modules (and ComfyUI's API) are imported only here."""
    from .nodes.extension import QuantizerExtension

    return QuantizerExtension()
