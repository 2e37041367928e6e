"""The one public entry point: source + config -> quantized file + report.

``quantize_model`` builds the plan, opens the streaming writer, and then handles one plan entry
at a time: read its tensors, quantize or copy them, write them, report progress, check for
cancel. Only one entry's tensors are alive at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import comfy_quant, dtypes, error_feedback, formats
from .calibration import CalibrationFile
from .config import OUTPUT_DTYPES, QuantConfig
from .errors import Cancelled, InputError, at
from .plan import Action, Plan, PlanEntry, build_plan
from .quantizer import quantize_layer
from .report import LayerReport, Report
from .source import Source
from .writer import StreamingWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where a conversion stands; ``layer`` is the report of the entry that just finished."""

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    current: str
    layer: LayerReport | None = None


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def plan_model(source: Source, config: QuantConfig) -> Plan:
    """The plan ``quantize_model`` would execute; reads only the header."""
    return build_plan(source, config)


def dry_run(source: Source, config: QuantConfig, output: Path | None = None) -> Report:
    """Report of the plan alone: decisions, sizes and loadability, with no tensor read."""
    return Report.from_plan(plan_model(source, config), output, dry_run=True)


def quantize_model(
    source: Source,
    config: QuantConfig,
    output: str | Path,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> Report:
    """Convert ``source`` under ``config`` into the safetensors file ``output``.

    The file appears only when complete (written to a temporary file, then renamed). Raises a
    :class:`~.errors.QuantError` subclass on bad input, bad options or a cancel; in every such
    case no output or temporary file is left behind.
    """
    output = Path(output)
    plan = plan_model(source, config)
    report = Report.from_plan(plan, output)
    device = torch.device(config.device)
    total_bytes = plan.bytes_before
    started = time.perf_counter()
    bytes_done = 0
    # --- learned rounding (issue 4) ---
    learned = _LearnedContext.open(config, device)
    # --- end learned rounding ---
    with StreamingWriter(
        output, plan.outputs, plan.metadata, overwrite=overwrite, input_path=source.path
    ) as writer:
        for i, (entry, layer_report) in enumerate(zip(plan.entries, report.layers, strict=True)):
            if cancel is not None and cancel():
                raise Cancelled(f"{source.name}: cancelled; no output written")
            t0 = time.perf_counter()
            outputs = _run_entry(source, entry, config, device, layer_report, learned)
            for name, tensor in outputs.items():
                writer.write(name, tensor)
            layer_report.time_s = time.perf_counter() - t0
            bytes_done += entry.bytes_before
            if progress is not None:
                progress(
                    Progress(
                        i + 1, len(plan.entries), bytes_done, total_bytes, entry.layer, layer_report
                    )
                )
        if cancel is not None and cancel():
            raise Cancelled(f"{source.name}: cancelled; no output written")
        writer.commit()
    # --- learned rounding (issue 4) ---
    report.notes.extend(learned.notes(report))
    # --- end learned rounding ---
    report.elapsed_s = time.perf_counter() - started
    return report


def _run_entry(
    source: Source,
    entry: PlanEntry,
    config: QuantConfig,
    device: torch.device,
    rep: LayerReport,
    learned: _LearnedContext | None = None,
) -> dict[str, torch.Tensor]:
    """The output tensors of one plan entry (updates ``rep`` with what it measured)."""
    if entry.action is Action.DROP:
        return {}
    if entry.action is Action.KEEP:
        out = entry.outputs[0]
        tensor = source.read(entry.key)
        if out.dtype != entry.inputs[0].dtype:
            tensor = tensor.to(OUTPUT_DTYPES[config.output_dtype])  # type: ignore[index]
        return {out.name: tensor}
    if entry.action is Action.UPGRADE_LEGACY:
        return _upgrade_legacy(source, entry)
    # --- learned rounding (issue 4) ---
    if learned is not None and (entry.rounding == "learned" or entry.calibration is not None):
        return learned.quantize(source, entry, rep)
    # --- end learned rounding ---
    return _quantize_entry(source, entry, device, rep)


def _quantize_entry(
    source: Source, entry: PlanEntry, device: torch.device, rep: LayerReport
) -> dict[str, torch.Tensor]:
    fmt = entry.fmt
    assert fmt is not None and entry.settings is not None
    weight = source.read(entry.key).to(device)
    try:
        codes, scale = formats.quantize(weight, fmt)
    except formats.NonFiniteWeightError:
        raise InputError(f"{at(source.name, entry.layer)}: weight contains NaN or Inf") from None
    rep.weight_sqnr_db = formats.error_energy(weight, codes, scale, fmt).sqnr_db
    return comfy_quant.layer_tensors(entry.layer, codes, scale, entry.settings)


def _upgrade_legacy(source: Source, entry: PlanEntry) -> dict[str, torch.Tensor]:
    """Rewrite one legacy scaled_fp8 layer: same codes, scales renamed (lossless)."""
    assert entry.settings is not None
    weight = source.read(entry.inputs[0].name)
    scale = source.read(entry.inputs[1].name).float().reshape(())
    wants_input = any(t.name.endswith(comfy_quant.INPUT_SCALE_SUFFIX) for t in entry.outputs)
    input_scale = source.read(entry.inputs[2].name).float() if wants_input else None
    return comfy_quant.layer_tensors(
        entry.layer, weight, scale, entry.settings, input_scale=input_scale
    )


# --- learned rounding (issue 4) ----------------------------------------------------------------
class _LearnedContext:
    """What learned rounding needs across entries: the calibration file, the kernel choice."""

    def __init__(self, config: QuantConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.calibration = CalibrationFile(config.calibration) if config.calibration else None
        self.use_triton, reason = error_feedback.triton_status(device)
        self.fallbacks: list[str] = []
        if not self.use_triton and device.type == "cuda":
            self._fallback(f"error feedback runs in PyTorch, not Triton: {reason}")

    @classmethod
    def open(cls, config: QuantConfig, device: torch.device) -> _LearnedContext | None:
        if config.rounding != "learned" and config.calibration is None:
            return None
        return cls(config, device)

    def _fallback(self, message: str) -> None:
        if message not in self.fallbacks:
            log.warning("%s", message)
            self.fallbacks.append(message)

    def quantize(
        self, source: Source, entry: PlanEntry, rep: LayerReport
    ) -> dict[str, torch.Tensor]:
        fmt = entry.fmt
        assert fmt is not None and entry.settings is not None
        weight = source.read(entry.key).to(self.device)
        stats = None
        if self.calibration is not None and entry.calibration is not None:
            stats = self.calibration.get(entry.calibration)
            if stats is not None and stats.in_features != weight.shape[1]:
                raise InputError(
                    f"{at(source.name, entry.layer)}: calibration {entry.calibration} has "
                    f"{stats.in_features} input features, the weight {weight.shape[1]}"
                )
        bias_in = [t for t in entry.inputs[1:] if t.name.endswith(comfy_quant.BIAS_SUFFIX)]
        bias = source.read(bias_in[0].name).to(self.device) if bias_in else None
        try:
            result = quantize_layer(
                weight,
                fmt,
                rounding=entry.rounding,
                stats=stats,
                bias=bias,
                options=self.config.learned,
                seed=self.config.seed,
                use_triton=self.use_triton,
            )
        except formats.NonFiniteWeightError:
            raise InputError(
                f"{at(source.name, entry.layer)}: weight contains NaN or Inf"
            ) from None
        if "learned_skipped" in result.extra:
            self._fallback(
                f"round-to-nearest where learned was asked: {result.extra['learned_skipped']}"
            )
        rep.weight_sqnr_db = result.weight_sqnr_db
        rep.output_sqnr_db = result.output_sqnr_db
        rep.extra.update(result.extra)
        wanted = {t.name: t for t in entry.outputs}
        input_scale = None
        if entry.layer + comfy_quant.INPUT_SCALE_SUFFIX in wanted:
            input_scale = result.input_scale if result.input_scale is not None else torch.ones(())
        out = comfy_quant.layer_tensors(
            entry.layer, result.codes, result.scale, entry.settings, input_scale=input_scale
        )
        if bias_in:
            target = wanted[bias_in[0].name]
            value = result.bias if result.bias is not None else bias
            assert value is not None
            out[target.name] = value.to(dtypes.to_torch(target.dtype))
        return out

    def notes(self, report: Report) -> list[str]:
        learned = [r for r in report.quantized if "kept" in r.extra]
        lines = list(self.fallbacks)
        if learned:
            kept_rtn = [r.name for r in learned if r.extra["kept"] == "nearest"]
            gains = [
                r.output_sqnr_db - r.extra["rtn_output_sqnr_db"]
                for r in learned
                if r.output_sqnr_db is not None and "rtn_output_sqnr_db" in r.extra
            ]
            line = f"learned rounding: {len(learned) - len(kept_rtn)} of {len(learned)} layers"
            if gains:
                line += f", output SQNR {sum(gains) / len(gains):+.2f} dB mean vs round-to-nearest"
            if kept_rtn:
                line += (
                    f"; the guard kept round-to-nearest for {len(kept_rtn)}: "
                    + ", ".join(kept_rtn[:5])
                    + (" ..." if len(kept_rtn) > 5 else "")
                )
            lines.append(line)
        return lines


# --- end learned rounding ----------------------------------------------------------------------
