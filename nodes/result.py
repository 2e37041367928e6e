"""The Quantize node's result: a quantized file kept on disk, never in RAM, and its report.

The file lives in ComfyUI's temp folder for as long as ComfyUI caches the node's output: it is
deleted when the result object is dropped (cache eviction, a new run) or at interpreter exit;
ComfyUI also empties its temp folder at start-up. Free of ComfyUI imports.
"""

from __future__ import annotations

import enum
import secrets
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from ..quant_core import Progress, QuantConfig, Report, Source, quantize_model


class ModelType(str, enum.Enum):
    """What a result is, which picks the folder Save Quantized puts it in by default."""

    DIFFUSION_MODEL = "diffusion_models"
    TEXT_ENCODER = "text_encoders"
    CHECKPOINT = "checkpoints"


class QuantizedFile:
    """A finished quantized safetensors file in a temp folder, deleted with this object."""

    def __init__(
        self, path: Path, report: Report, *, model_type: ModelType, source_name: str
    ) -> None:
        self.path = Path(path)
        self.report = report
        self.model_type = model_type
        self.source_name = source_name
        self._finalizer = weakref.finalize(self, self.path.unlink, missing_ok=True)

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def discard(self) -> None:
        """Delete the temp file now (also happens when the object is garbage collected)."""
        self._finalizer()

    def __repr__(self) -> str:  # shown by ComfyUI in error details
        return f"QuantizedFile({self.source_name!r} -> {self.path.name}, {self.model_type.value})"


def quantize_to_temp(
    source: Source,
    config: QuantConfig,
    temp_dir: Path,
    *,
    model_type: ModelType,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> QuantizedFile:
    """Run ``quantize_model`` into a new file under ``temp_dir``.

    On any error or a cancel the ``quant_core`` error propagates and no file is left behind.
    ComfyUI runs nodes under ``torch.inference_mode()``, which is thread-local: quant_core's CPU
    worker threads would then fill tensors created as inference tensors outside that mode, which
    torch refuses. The conversion needs no autograd either way, so it runs outside the mode.
    """
    temp_dir = Path(temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    dest = temp_dir / f"quantized_{secrets.token_hex(8)}.safetensors"
    with torch.inference_mode(False):
        report = quantize_model(source, config, dest, progress=progress, cancel=cancel)
    return QuantizedFile(dest, report, model_type=model_type, source_name=source.name)
