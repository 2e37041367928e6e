"""The Quantize node's widgets as plain data, and their translation into a ``QuantConfig``.

Kept free of ComfyUI imports so that CI tests it without a server. The node module only lists
these choices as widgets and passes the chosen values here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..quant_core import (
    OUTPUT_DTYPES,
    ROUNDINGS,
    ConfigError,
    Format,
    Kind,
    LayerConfig,
    LearnedOptions,
    QuantConfig,
    RuleOptions,
    Scaling,
    parse_layer_config,
)
from ..quant_core.presets import SELECTABLE

PACK_ONLY_MARK = " [needs pack]"

_FORMAT_ORDER = (
    (Kind.FP8, Scaling.TENSOR),
    (Kind.INT8, Scaling.ROW),
    (Kind.INT8, Scaling.TENSOR),
    (Kind.FP8, Scaling.ROW),
    (Kind.FP8, Scaling.BLOCK),
    (Kind.INT8, Scaling.BLOCK),
)


def _format_choices() -> dict[str, tuple[Kind, Scaling]]:
    """Widget label -> (kind, scaling): stock-loadable formats first, pack-only ones marked."""
    choices = {}
    for kind, scaling in _FORMAT_ORDER:
        fmt = Format(kind, scaling, 128)
        label = f"{kind.value} {scaling.value}" + ("" if fmt.stock_loadable else PACK_ONLY_MARK)
        choices[label] = (kind, scaling)
    return choices


# Pack-only labels carry PACK_ONLY_MARK so nobody writes a file stock ComfyUI refuses unawares.
FORMATS: Mapping[str, tuple[Kind, Scaling]] = MappingProxyType(_format_choices())

PRESETS = ("auto", *SELECTABLE)  # auto: detect the architecture of each part of the model
DEVICES = ("auto", "cpu")
# "auto": as stored for files; bf16 for a MODEL/CLIP input (ComfyUI may hold those upcast).
KEEP_DTYPES = ("auto", "keep", *OUTPUT_DTYPES)
# Learned rounding's widgets start at quant_core's measured defaults.
LEARNED_DEFAULTS = LearnedOptions()


@dataclass(frozen=True, kw_only=True)
class QuantizeWidgets:
    """The raw values of the Quantize node's widgets (what the graph holds)."""

    preset: str = "auto"
    format: str = next(iter(FORMATS))
    block_size: int = 128
    rounding: str = "nearest"
    keep_dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    layer_config: str = ""  # JSON text, as in a --layer-config file; empty: none
    # learned rounding (used when rounding == "learned")
    objective: str = LEARNED_DEFAULTS.objective
    optimizer: str = LEARNED_DEFAULTS.optimizer
    lr_schedule: str = LEARNED_DEFAULTS.schedule
    lr: float = LEARNED_DEFAULTS.lr
    iterations: int = LEARNED_DEFAULTS.num_iter
    lr_gamma: float = LEARNED_DEFAULTS.lr_gamma
    lr_patience: int = LEARNED_DEFAULTS.lr_patience
    lr_factor: float = LEARNED_DEFAULTS.lr_factor
    lr_min: float = LEARNED_DEFAULTS.lr_min
    calibration: str | None = None  # path of a calibration file (the Calibrate node's output)


def config_from_widgets(
    widgets: QuantizeWidgets,
    *,
    from_graph_object: bool,
    compute_device: str,
    cpu_threads: int | None = None,
) -> QuantConfig:
    """The ``QuantConfig`` for ``widgets``; raises ``ConfigError`` naming the widget at fault.

    ``from_graph_object``: the source is a MODEL/CLIP (not a file), which decides what
    ``keep_dtype="auto"`` means. ``compute_device``: ComfyUI's device, used for ``auto``.
    ``cpu_threads``: worker threads for CPU math (``None``: leave torch's threads alone).
    """
    if widgets.format not in FORMATS:
        raise ConfigError(f"format: unknown choice {widgets.format!r}; use one of {list(FORMATS)}")
    kind, scaling = FORMATS[widgets.format]
    if widgets.rounding not in ROUNDINGS:
        raise ConfigError(f"rounding: unknown choice {widgets.rounding!r}; use one of {ROUNDINGS}")
    if widgets.rounding == "learned" and widgets.objective == "output" and not widgets.calibration:
        raise ConfigError(
            "calibration: learned rounding with the output objective needs the inputs each "
            "layer sees; connect a 'Calibrate for Learned Rounding' node to calibration, or set "
            "objective to svd (a data-free proxy that rarely beats nearest)"
        )
    if widgets.keep_dtype not in KEEP_DTYPES:
        raise ConfigError(
            f"keep_dtype: unknown choice {widgets.keep_dtype!r}; use one of {KEEP_DTYPES}"
        )
    if widgets.device not in DEVICES:
        raise ConfigError(f"device: unknown choice {widgets.device!r}; use one of {DEVICES}")
    output_dtype: str | None
    if widgets.keep_dtype == "auto":
        output_dtype = "bf16" if from_graph_object else None
    elif widgets.keep_dtype == "keep":
        output_dtype = None
    else:
        output_dtype = widgets.keep_dtype
    device = compute_device if widgets.device == "auto" else widgets.device
    if widgets.preset not in PRESETS:
        raise ConfigError(f"preset: unknown choice {widgets.preset!r}; use one of {PRESETS}")
    try:
        rules = RuleOptions(
            preset=widgets.preset, layer_config=parse_layer_config_text(widgets.layer_config)
        )
        learned = dataclasses.replace(
            LEARNED_DEFAULTS,
            objective=widgets.objective,
            optimizer=widgets.optimizer,
            schedule=widgets.lr_schedule,
            lr=widgets.lr,
            num_iter=widgets.iterations,
            lr_gamma=widgets.lr_gamma,
            lr_patience=widgets.lr_patience,
            lr_factor=widgets.lr_factor,
            lr_min=widgets.lr_min,
        )
        return QuantConfig(
            kind=kind,
            scaling=scaling,
            block_size=widgets.block_size,
            rounding=widgets.rounding,
            output_dtype=output_dtype,
            device=device,
            seed=widgets.seed,
            cpu_threads=cpu_threads,
            rules=rules,
            learned=learned,
            calibration=widgets.calibration,
        )
    except ConfigError as e:
        raise ConfigError(f"Quantize node: {e}") from None


def parse_layer_config_text(text: str) -> LayerConfig | None:
    """The layer-config widget's JSON (the ``--layer-config`` file format); ``None`` if blank."""
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"layer_config: not valid JSON ({e})") from None
    return parse_layer_config(data, origin="(layer_config widget)")


def describe_choices() -> Mapping[str, str]:
    """Format label -> the ``comfy_quant`` format name it writes (for tooltips)."""
    return {label: Format(kind, scaling, 128).name for label, (kind, scaling) in FORMATS.items()}
