"""quant_core: everything that decides and computes. Pure PyTorch; never imports ComfyUI.

Public API::

    from comfyui_quantizer.quant_core import QuantConfig, SafetensorsSource, quantize_model

    with SafetensorsSource("model.safetensors") as src:
        config = QuantConfig(kind="int8", scaling="row")
        report = quantize_model(src, config, "model_int8.safetensors")
    print(report.table())
"""

from .config import OUTPUT_DTYPES, ROUNDINGS, QuantConfig, default_cpu_threads
from .errors import Cancelled, ConfigError, InputError, OutputError, QuantError
from .formats import Format, Kind, Scaling
from .layer_config import LayerConfig, load_layer_config, parse_layer_config
from .learned import LearnedOptions  # issue 4: options of learned rounding (QuantConfig.learned)
from .pipeline import Progress, dry_run, plan_model, quantize_model
from .plan import Plan
from .report import LayerReport, Report
from .rules import RuleOptions, layer_config_template
from .source import SafetensorsSource, Source, TensorInfo

__all__ = [
    "OUTPUT_DTYPES",
    "ROUNDINGS",
    "Cancelled",
    "ConfigError",
    "Format",
    "InputError",
    "Kind",
    "LayerConfig",
    "LayerReport",
    "LearnedOptions",
    "OutputError",
    "Plan",
    "Progress",
    "QuantConfig",
    "QuantError",
    "Report",
    "RuleOptions",
    "SafetensorsSource",
    "Scaling",
    "Source",
    "TensorInfo",
    "default_cpu_threads",
    "dry_run",
    "layer_config_template",
    "load_layer_config",
    "parse_layer_config",
    "plan_model",
    "quantize_model",
]
