"""Calibrate for Learned Rounding: run the MODEL a few sampler steps and record what every
linear layer sees, so that learned rounding minimises the error of the outputs that matter.

Declarations only; the recording is ``result.record_calibration`` (tested without ComfyUI).
Imported only by ComfyUI.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ..quant_core import QuantError
from . import comfy_io
from .quantizer_nodes import CATEGORY, CalibrationType, QuantizerError
from .result import record_calibration


class CalibrateForLearnedRounding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="QuantizerCalibrate",
            display_name="Calibrate for Learned Rounding",
            category=CATEGORY,
            description="Samples a few steps with your conditioning and latent while recording "
            "the inputs of every linear layer (second moments, means, peaks) for Quantize's "
            "learned rounding. Use the full-precision MODEL that you quantize.",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision model to be quantized."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="E.g. an empty latent of your size."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False),
                io.Int.Input(
                    "steps",
                    default=4,
                    min=1,
                    max=100,
                    tooltip="A few steps cover early and late timesteps.",
                ),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="As you sample (1.0 for guidance-distilled models).",
                ),
                io.Combo.Input("sampler_name", options=comfy_io.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy_io.SCHEDULERS, default="simple"),
            ],
            outputs=[
                CalibrationType.Output("calibration", tooltip="For Quantize's calibration."),
                io.Latent.Output("latent", tooltip="The sampled latent (for a look)."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: Any,
        positive: Any,
        negative: Any,
        latent_image: dict[str, Any],
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
    ) -> io.NodeOutput:
        sampled: dict[str, Any] = {}

        def run() -> None:
            sampled.update(
                comfy_io.sample(
                    model,
                    seed=seed,
                    steps=steps,
                    cfg=cfg,
                    sampler_name=sampler_name,
                    scheduler=scheduler,
                    positive=positive,
                    negative=negative,
                    latent=latent_image,
                )
            )

        try:
            stats = record_calibration(
                comfy_io.diffusion_module(model), run, comfy_io.temp_folder(), seed=seed
            )
        except QuantError as e:
            raise QuantizerError(str(e)) from None
        return io.NodeOutput(stats, sampled)
