"""comfyui-quantizer: a ComfyUI node pack and CLI that writes 8-bit ComfyUI checkpoints.

ComfyUI imports this folder as a custom node pack; pip installs it as ``comfyui_quantizer``.
Importing it is cheap and needs no ComfyUI: nodes are only built when ComfyUI asks for them.
"""

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"
