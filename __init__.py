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


async def comfy_entrypoint() -> QuantizerExtension:
    """ComfyUI's V3 entry point; the node modules (and ComfyUI's API) are imported only here."""
    from .nodes.extension import QuantizerExtension

    return QuantizerExtension()
