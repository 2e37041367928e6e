"""The V3 nodes: Load Model for Quantization -> Quantize Model -> Save Quantized Model.

Declarations only: each ``execute`` turns widgets into plain values and hands off to
``quant_core`` and the ComfyUI-free helpers of this package. Imported only by ComfyUI.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from comfy_api.latest import io

from ..quant_core import Cancelled, QuantError, Source, default_cpu_threads
from ..quant_core.learned import OBJECTIVES, OPTIMIZERS, SCHEDULES
from . import comfy_io, saving
from .events import EVENT_DONE, EVENT_START, UI_KEY, start_payload, summary_payload
from .options import (
    DEVICES,
    FORMATS,
    KEEP_DTYPES,
    LEARNED_DEFAULTS,
    PACK_ONLY_MARK,
    PRESETS,
    ROUNDINGS,
    QuantizeWidgets,
    config_from_widgets,
    describe_choices,
)
from .result import CalibrationStats, ModelType, QuantizedFile, quantize_to_temp
from .sources import ModelFile, clip_source, model_source

CATEGORY = "model/quantization"
SourceType = io.Custom("QUANT_SOURCE")
QuantizedType = io.Custom("QUANTIZED_MODEL")
CalibrationType = io.Custom("QUANT_CALIBRATION")


class QuantizerError(Exception):
    """A user error shown on the node as its one-line message (quant_core's own text)."""


class LoadModelForQuantization(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuantizerLoadModel",
            display_name="Load Model for Quantization",
            category=CATEGORY,
            description="Picks a safetensors file to quantize. Nothing is loaded: Quantize "
            "reads one tensor at a time.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=comfy_io.model_choices(),
                    tooltip="A file from diffusion_models, checkpoints or text_encoders.",
                ),
            ],
            outputs=[SourceType.Output("source", tooltip="The file, for the Quantize node.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str) -> Any:
        # A file replaced under the same name must be read again.
        try:
            _, path = comfy_io.resolve_model_choice(model_name)
            stat = os.stat(path)
        except (OSError, ValueError):
            return float("nan")
        return (stat.st_size, stat.st_mtime_ns)

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        folder, path = comfy_io.resolve_model_choice(model_name)
        model_file = ModelFile(path, ModelType(folder))  # the folder names are its values
        try:
            with model_file.open():  # validates the header now, not halfway through a run
                pass
        except QuantError as e:
            raise QuantizerError(str(e)) from None
        return io.NodeOutput(model_file)


class QuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = describe_choices()
        format_help = "; ".join(f"{label} writes {name}" for label, name in names.items())
        return io.Schema(
            node_id="QuantizerQuantize",
            display_name="Quantize Model (8-bit)",
            category=CATEGORY,
            description="Converts a model to 8-bit ComfyUI weights (FP8 E4M3 or INT8) into a "
            "temporary file, reports the quality of every layer, and rebuilds a MODEL from the "
            "result for an A/B against the original.",
            inputs=[
                SourceType.Input("source", optional=True, tooltip="A file from Load Model."),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Or a MODEL from the graph: its LoRAs and patches are baked in.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Or a CLIP holding one T5-XXL / LLM text encoder (CLIP-L/G and "
                    "other T5 are refused: ComfyUI's loaders for them ignore quantization).",
                ),
                CalibrationType.Input(
                    "calibration",
                    optional=True,
                    tooltip="Input statistics from Calibrate for Learned Rounding: learned "
                    "rounding minimises each layer's output error on them (and FP8 layers get a "
                    "calibrated input_scale).",
                ),
                io.Combo.Input(
                    "preset",
                    options=list(PRESETS),
                    default="auto",
                    tooltip="Which layers stay in high precision. auto: detected from the model "
                    "(Flux, Chroma, WAN, Hunyuan, Qwen-Image, Z-Image, T5, LLM encoders...).",
                ),
                io.Combo.Input(
                    "format",
                    options=list(FORMATS),
                    default=next(iter(FORMATS)),
                    tooltip="Code type and scale granularity. Formats marked"
                    f"{PACK_ONLY_MARK} only load where this pack is installed. {format_help}.",
                ),
                io.Int.Input(
                    "block_size",
                    default=128,
                    min=16,
                    max=4096,
                    step=16,
                    tooltip="Block edge for the block formats (ignored by the others).",
                ),
                io.Combo.Input(
                    "rounding",
                    options=list(ROUNDINGS),
                    default="nearest",
                    tooltip="nearest: round-to-nearest (fast). learned: optimise the rounding "
                    "of each layer for its outputs (connect calibration, or objective svd).",
                ),
                *_learned_inputs(),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,
                    tooltip="Seed of anything random (learned rounding).",
                ),
                io.String.Input(
                    "layer_config",
                    multiline=True,
                    default="",
                    placeholder='optional per-layer rules (JSON), e.g. {"rules": '
                    '[{"pattern": "final_layer", "skip": true}]}',
                    tooltip="Per-layer rules in the --layer-config JSON format (first match "
                    "wins; skip keeps a layer). Empty: the preset alone decides.",
                ),
                io.Combo.Input(
                    "keep_dtype",
                    options=list(KEEP_DTYPES),
                    default="auto",
                    advanced=True,
                    tooltip="dtype of the tensors that stay unquantized. auto: as stored for "
                    "a file, bf16 for a MODEL/CLIP (ComfyUI may hold those upcast to fp32).",
                ),
                io.Combo.Input(
                    "device",
                    options=list(DEVICES),
                    default="auto",
                    advanced=True,
                    tooltip="Where the math runs. auto: ComfyUI's GPU if there is one.",
                ),
            ],
            outputs=[
                QuantizedType.Output(
                    "quantized", tooltip="The quantized file (temporary), for Save Quantized."
                ),
                io.Model.Output(
                    "model",
                    tooltip="The quantized diffusion model on ComfyUI's own quantized ops, "
                    "for an A/B against the original (none for a text encoder).",
                ),
                io.String.Output("report", tooltip="Summary and per-layer table as text."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        preset: str,
        format: str,
        block_size: int,
        rounding: str,
        seed: int,
        layer_config: str,
        keep_dtype: str,
        device: str,
        source: ModelFile | None = None,
        model: Any = None,
        clip: Any = None,
        calibration: CalibrationStats | None = None,
        objective: str = LEARNED_DEFAULTS.objective,
        optimizer: str = LEARNED_DEFAULTS.optimizer,
        lr_schedule: str = LEARNED_DEFAULTS.schedule,
        lr: float = LEARNED_DEFAULTS.lr,
        iterations: int = LEARNED_DEFAULTS.num_iter,
        lr_gamma: float = LEARNED_DEFAULTS.lr_gamma,
        lr_patience: int = LEARNED_DEFAULTS.lr_patience,
        lr_factor: float = LEARNED_DEFAULTS.lr_factor,
        lr_min: float = LEARNED_DEFAULTS.lr_min,
    ) -> io.NodeOutput:
        node_id = str(cls.hidden.unique_id)
        inputs = {"source": source, "model": model, "clip": clip}
        given = [name for name, value in inputs.items() if value is not None]
        if len(given) != 1:
            raise QuantizerError(
                "connect exactly one of the inputs source, model or clip"
                + (f" (got {', '.join(given)})" if given else "")
            )
        widgets = QuantizeWidgets(
            preset=preset,
            format=format,
            block_size=block_size,
            rounding=rounding,
            keep_dtype=keep_dtype,
            device=device,
            seed=seed,
            layer_config=layer_config,
            objective=objective,
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            lr=lr,
            iterations=iterations,
            lr_gamma=lr_gamma,
            lr_patience=lr_patience,
            lr_factor=lr_factor,
            lr_min=lr_min,
            calibration=None if calibration is None else str(calibration.path),
        )
        try:
            config = config_from_widgets(
                widgets,
                from_graph_object=source is None,
                compute_device=comfy_io.compute_device(),
                cpu_threads=default_cpu_threads(),
            )
            with ExitStack() as stack:
                src, model_type = _open_source(stack, source, model, clip)
                comfy_io.send(
                    EVENT_START, start_payload(node_id, source=src.name, fmt=config.format.label)
                )
                result = quantize_to_temp(
                    src,
                    config,
                    comfy_io.temp_folder(),
                    model_type=model_type,
                    progress=comfy_io.ProgressReporter(node_id),
                    cancel=comfy_io.interrupted,
                )
        except Cancelled as e:
            comfy_io.raise_interrupt(e)
        except QuantError as e:
            raise QuantizerError(str(e)) from None
        rebuilt = None
        if result.model_type is not ModelType.TEXT_ENCODER:
            rebuilt, why_not = comfy_io.load_diffusion_model(result.path)
            if why_not is not None:
                result.report.notes.append(why_not)
        summary = summary_payload(node_id, result.report)
        comfy_io.send(EVENT_DONE, summary)
        text = result.report.summary() + "\n\n" + result.report.table()
        return io.NodeOutput(result, rebuilt, text, ui={UI_KEY: [summary]})


def _learned_inputs() -> list[io.Input]:
    """Learned rounding's knobs (optional: an API prompt may leave them at the defaults)."""
    d = LEARNED_DEFAULTS
    only = " (learned rounding only)"
    return [
        io.Combo.Input("objective", options=list(OBJECTIVES), default=d.objective, optional=True,
                       tooltip="output: each layer's output error on the calibration inputs. "
                       "svd: a data-free proxy that rarely beats nearest" + only),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default=d.optimizer, optional=True,
                       tooltip="original: coordinate descent on the codes; adamw/radam: a "
                       "continuous value per weight, rounded" + only),
        io.Combo.Input("lr_schedule", options=list(SCHEDULES), default=d.schedule,
                       optional=True, tooltip="How the learning rate moves" + only),
        io.Float.Input("lr", default=d.lr, min=1e-6, max=10.0, step=0.001, round=False,
                       optional=True, tooltip="Learning rate: a fraction of a row for "
                       "original, code steps for adamw/radam" + only),
        io.Int.Input("iterations", default=d.num_iter, min=0, max=10_000, optional=True,
                     tooltip="Refinement steps per layer (early stop ends sooner)" + only),
        io.Float.Input("lr_gamma", default=d.lr_gamma, min=0.01, max=1.0, step=0.01,
                       optional=True, advanced=True, tooltip="exponential: lr x gamma^step"
                       + only),
        io.Int.Input("lr_patience", default=d.lr_patience, min=0, max=1000, optional=True,
                     advanced=True, tooltip="plateau: steps without improvement before the "
                     "lr drops" + only),
        io.Float.Input("lr_factor", default=d.lr_factor, min=0.01, max=1.0, step=0.01,
                       optional=True, advanced=True, tooltip="plateau/adaptive: lr x factor "
                       "after a step that did not improve" + only),
        io.Float.Input("lr_min", default=d.lr_min, min=1e-8, max=1.0, step=1e-5, round=False,
                       optional=True, advanced=True, tooltip="Lowest lr of the schedules"
                       + only),
    ]  # fmt: skip


def _open_source(
    stack: ExitStack, source: ModelFile | None, model: Any, clip: Any
) -> tuple[Source, ModelType]:
    if source is not None:
        return stack.enter_context(source.open()), source.model_type
    if model is not None:
        return model_source(model), ModelType.DIFFUSION_MODEL
    return clip_source(clip), ModelType.TEXT_ENCODER


class SaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuantizerSave",
            display_name="Save Quantized Model",
            category=CATEGORY,
            description="Saves the quantized file under a new name (never overwrites); it shows "
            "up in the loader lists at once.",
            inputs=[
                QuantizedType.Input("quantized"),
                io.String.Input(
                    "filename_prefix",
                    default="quantized/model",
                    tooltip="File name, optionally in a sub-folder; _00001_.safetensors is "
                    "appended. '..' and absolute paths are refused.",
                ),
                io.Combo.Input(
                    "destination",
                    options=["auto", *comfy_io.SAVE_FOLDERS],
                    default="auto",
                    tooltip="auto: diffusion_models, text_encoders or checkpoints, after what "
                    "was quantized.",
                ),
            ],
            outputs=[io.String.Output("filename", tooltip="Saved name, as the loaders list it.")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None = None) -> bool | str:
        if filename_prefix is None:  # linked from another node: checked when it runs
            return True
        try:
            saving.check_prefix(filename_prefix)
        except QuantError as e:
            return str(e)
        return True

    @classmethod
    def execute(
        cls, quantized: QuantizedFile, filename_prefix: str, destination: str
    ) -> io.NodeOutput:
        folder_name = quantized.model_type.value if destination == "auto" else destination
        folder = comfy_io.save_folder(folder_name)
        try:
            path = saving.save_unique(quantized.path, folder, filename_prefix)
        except QuantError as e:
            raise QuantizerError(str(e)) from None
        name = path.relative_to(folder).as_posix()
        saved = {"filename": name, "folder": folder_name, "loads_in_stock_comfyui": (
            quantized.report.stock_loadable)}  # fmt: skip
        return io.NodeOutput(name, ui={UI_KEY + "_saved": [saved]})


NODES: list[type[io.ComfyNode]] = [LoadModelForQuantization, QuantizeModel, SaveQuantized]
