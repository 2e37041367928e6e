"""What the user asked for, validated once: a frozen ``QuantConfig``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .formats import Format, Kind, Scaling
from .learned import LearnedOptions
from .rules import RuleOptions

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
ROUNDINGS = ("nearest", "learned")


def default_cpu_threads() -> int:
    """CPU workers for the math: one per core, at most 8 (the conversion is I/O-bound beyond)."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Options for one conversion.

    ``kind``/``scaling``/``block_size`` pick the primary format (default: FP8 per-tensor, which
    stock ComfyUI loads). ``output_dtype`` casts the tensors that stay unquantized (``None``
    keeps their dtype). ``device`` is where the math runs (``cpu``, ``cuda``, ``cuda:1``).
    ``upgrade_legacy`` rewrites a legacy ``scaled_fp8`` checkpoint losslessly in the
    comfy_quant layout instead of refusing it. ``cpu_threads`` is the number of worker threads for
    the CPU math (torch runs single-threaded inside each); ``None`` leaves torch's threads alone.
    """

    kind: Kind = Kind.FP8
    scaling: Scaling = Scaling.TENSOR
    block_size: int = 128
    rounding: str = "nearest"
    output_dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    upgrade_legacy: bool = False
    cpu_threads: int | None = None
    rules: RuleOptions = field(default_factory=RuleOptions)
    # --- learned rounding (issue 4): options of the search, and the calibration file ---
    learned: LearnedOptions = field(default_factory=LearnedOptions)
    calibration: str | None = None
    # --- end learned rounding ---

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", Kind(self.kind))
        except ValueError:
            raise ConfigError(f"unknown format kind {self.kind!r}; use 'fp8' or 'int8'") from None
        try:
            object.__setattr__(self, "scaling", Scaling(self.scaling))
        except ValueError:
            raise ConfigError(
                f"unknown scaling mode {self.scaling!r}; use 'tensor', 'row' or 'block'"
            ) from None
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool):
            raise ConfigError(f"block size must be an integer, got {self.block_size!r}")
        if not 1 <= self.block_size <= 4096:
            raise ConfigError(f"block size must be between 1 and 4096, got {self.block_size}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {self.rounding!r}; use one of {ROUNDINGS}")
        if self.output_dtype is not None and self.output_dtype not in OUTPUT_DTYPES:
            raise ConfigError(
                f"unknown output dtype {self.output_dtype!r}; use one of {sorted(OUTPUT_DTYPES)}"
            )
        if self.cpu_threads is not None and (
            not isinstance(self.cpu_threads, int) or self.cpu_threads < 1
        ):
            raise ConfigError(f"cpu threads must be a positive integer, got {self.cpu_threads!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"unknown device {self.device!r}; use 'cpu' or 'cuda[:N]'") from None
        # --- learned rounding (issue 4) ---
        if not isinstance(self.learned, LearnedOptions):
            raise ConfigError("learned must be a LearnedOptions (see quant_core.learned)")
        if (
            self.rounding == "learned"
            and self.learned.objective == "output"
            and self.calibration is None
        ):
            raise ConfigError(
                "learned rounding with the output objective needs calibration statistics: "
                "pass --calibration FILE (record it with CalibrationRecorder), or use "
                "--objective svd for the data-free proxy"
            )
        # --- end learned rounding ---

    @property
    def format(self) -> Format:
        """The primary quantization format."""
        return Format(
            self.kind, self.scaling, self.block_size if self.scaling is Scaling.BLOCK else None
        )
