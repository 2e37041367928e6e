"""The ComfyUI extension object: the list of nodes. Imported only by ``comfy_entrypoint``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .calibrate_node import CalibrateForLearnedRounding
from .quantizer_nodes import NODES


class QuantizerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*NODES, CalibrateForLearnedRounding]
