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
from ..quant_core.calibration import CalibrationRecorder


class ModelType(str, enum.Enum):
    """What a result is, which picks the folder Save Quantized puts it in by default."""

    DIFFUSION_MODEL = "diffusion_models"
    TEXT_ENCODER = "text_encoders"
    CHECKPOINT = "checkpoints"


class TempFile:
    """A file in ComfyUI's temp folder owned by a node output; deleted with this object."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._finalizer = weakref.finalize(self, self.path.unlink, missing_ok=True)

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def discard(self) -> None:
        """Delete the file now (also happens when the object is garbage collected)."""
        self._finalizer()


class QuantizedFile(TempFile):
    """A finished quantized safetensors file and its report."""

    def __init__(self, path: Path, report: Report, *, model_type: ModelType) -> None:
        super().__init__(path)
        self.report = report
        self.model_type = model_type

    def __repr__(self) -> str:  # shown by ComfyUI in error details
        return f"QuantizedFile({self.report.source!r} -> {self.path.name}, {self.model_type.value})"


class CalibrationStats(TempFile):
    """Per-layer input statistics (a ``CalibrationRecorder`` file) for learned rounding."""

    def __init__(self, path: Path, *, layers: int) -> None:
        super().__init__(path)
        self.layers = layers

    def __repr__(self) -> str:
        return f"CalibrationStats({self.layers} layers, {self.path.name})"


def record_calibration(
    module: torch.nn.Module, run: Callable[[], object], temp_dir: Path, *, seed: int = 0
) -> CalibrationStats:
    """Record the inputs of every linear layer of ``module`` while ``run()`` runs it.

    Keys are ``module``'s own weight names, so pass the module whose state dict matches the
    file being quantized (a diffusion model's ``diffusion_model``). Raises ``InputError`` if
    no linear layer ran; leaves no file behind on any error.
    """
    temp_dir = Path(temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    dest = temp_dir / f"calibration_{secrets.token_hex(8)}.safetensors"
    with CalibrationRecorder(module, seed=seed) as recorder:
        run()
    try:
        recorder.save(dest)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return CalibrationStats(dest, layers=len(recorder.keys()))


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
    """
    temp_dir = Path(temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    dest = temp_dir / f"quantized_{secrets.token_hex(8)}.safetensors"
    report = quantize_model(source, config, dest, progress=progress, cancel=cancel)
    return QuantizedFile(dest, report, model_type=model_type)
