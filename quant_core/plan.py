"""The plan: for every source tensor what is written, in which dtype and shape, and why.

A plan is built from the header alone (no tensor data) and is frozen; the writer lays out the
output file from it before any math runs, and ``--dry-run`` prints it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from . import comfy_quant, dtypes
from .config import OUTPUT_DTYPES, QuantConfig
from .detect import detect
from .errors import InputError
from .formats import Format, Kind, Scaling
from .rules import Decision, decide_all
from .source import Source, TensorInfo, describe_existing_quantization, legacy_scaled_fp8_prefix

PACK_VERSION = "0.1.0"


class Action(str, enum.Enum):
    QUANTIZE = "quantize"
    KEEP = "keep"
    DROP = "drop"
    UPGRADE_LEGACY = "upgrade-legacy"


@dataclass(frozen=True)
class PlanEntry:
    """One step: the source tensors it reads and the output tensors it writes."""

    key: str
    action: Action
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    fmt: Format | None = None
    settings: Mapping[str, object] | None = None
    rounding: str = "nearest"
    reason: str = ""
    # --- calibration (issue 4): the layer's key in the calibration file, if it has stats ---
    calibration: str | None = None
    # --- end calibration ---

    @property
    def layer(self) -> str:
        """Layer name for weights (``x.weight`` -> ``x``), else the tensor key."""
        if self.key.endswith(comfy_quant.WEIGHT_SUFFIX):
            return comfy_quant.layer_name(self.key)
        return self.key

    @property
    def bytes_before(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    @property
    def bytes_after(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass(frozen=True)
class Plan:
    """Every decision of a conversion, known before any tensor is read."""

    source_name: str
    entries: tuple[PlanEntry, ...]
    metadata: Mapping[str, str]
    architecture: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def outputs(self) -> list[TensorInfo]:
        return [t for e in self.entries for t in e.outputs]

    @property
    def quantized_layers(self) -> dict[str, Mapping[str, object]]:
        return {e.layer: e.settings for e in self.entries if e.settings is not None}

    @property
    def formats(self) -> list[Format]:
        seen: dict[str, Format] = {}
        for e in self.entries:
            if e.fmt is not None:
                seen.setdefault(e.fmt.label, e.fmt)
        return list(seen.values())

    @property
    def pack_only_formats(self) -> list[str]:
        """Format names in this plan that stock ComfyUI cannot load."""
        return sorted({f.name for f in self.formats if not f.stock_loadable})

    @property
    def stock_loadable(self) -> bool:
        return not self.pack_only_formats

    @property
    def largest_entry_bytes(self) -> int:
        """The most output bytes one entry produces."""
        return max((e.bytes_after for e in self.entries), default=0)

    @property
    def bytes_before(self) -> int:
        return sum(e.bytes_before for e in self.entries)

    @property
    def bytes_after(self) -> int:
        return sum(e.bytes_after for e in self.entries)


def build_plan(source: Source, config: QuantConfig) -> Plan:
    """Decide every tensor of ``source`` under ``config``; raises before any data is read.

    Records the detected architecture and every warning of the rules (``architecture``,
    ``notes``); see :mod:`.rules` for how each tensor is decided.
    """
    existing = describe_existing_quantization(source)
    legacy_prefix = legacy_scaled_fp8_prefix(source)
    if existing is not None and not (config.upgrade_legacy and legacy_prefix is not None):
        hint = (
            " Pass --upgrade-legacy to rewrite it losslessly in the comfy_quant layout."
            if legacy_prefix is not None
            else " Quantize the original full-precision model instead."
        )
        raise InputError(f"{source.name}: already quantized: {existing}.{hint}")

    infos = source.tensors()
    if not infos:
        raise InputError(f"{source.name}: the file holds no tensors")
    if legacy_prefix is not None:
        architecture = detect(infos).summary
        entries = _legacy_entries(source, legacy_prefix)
        notes: tuple[str, ...] = ("legacy scaled_fp8 layers rewritten without requantizing",)
    else:
        decisions = decide_all(source.name, infos, config)
        entries = [_entry(info, decisions.by_key[key], config) for key, info in infos.items()]
        notes, architecture = decisions.notes, decisions.architecture
        # --- calibration (issue 4) ---
        if config.calibration is not None:
            entries, calibration_notes = _calibrated(entries, config)
            notes = (*notes, *calibration_notes)
        # --- end calibration ---
    plan_entries = tuple(entries)
    quantized = {e.layer: e.settings for e in plan_entries if e.settings is not None}
    metadata = dict(source.metadata)
    metadata[comfy_quant.QUANT_METADATA_KEY] = comfy_quant.header_metadata(quantized)
    plan = Plan(source.name, plan_entries, metadata, architecture=architecture, notes=notes)
    metadata[comfy_quant.PACK_METADATA_KEY] = json.dumps(
        {
            "version": PACK_VERSION,
            "formats": sorted({str(s["format"]) for s in quantized.values()}),
            "requires_pack": not plan.stock_loadable,
        },
        separators=(",", ":"),
    )
    return plan


def _entry(info: TensorInfo, decision: Decision, config: QuantConfig) -> PlanEntry:
    if decision.drop:
        return PlanEntry(info.name, Action.DROP, (info,), (), reason=decision.reason)
    if decision.fmt is None:
        out_dtype = info.dtype
        if decision.keep_dtype is not None:
            out_dtype = decision.keep_dtype
        elif config.output_dtype is not None and info.dtype in dtypes.FLOAT_DTYPES:
            out_dtype = dtypes.to_safetensors(OUTPUT_DTYPES[config.output_dtype])
        return PlanEntry(
            key=info.name,
            action=Action.KEEP,
            inputs=(info,),
            outputs=(TensorInfo(info.name, out_dtype, info.shape),),
            reason=decision.reason,
        )
    layer = comfy_quant.layer_name(info.name)
    settings = comfy_quant.settings_for(
        decision.fmt, full_precision_matrix_mult=decision.weight_only
    )
    specs = comfy_quant.output_specs(layer, info.shape, decision.fmt, settings)
    return PlanEntry(
        key=info.name,
        action=Action.QUANTIZE,
        inputs=(info,),
        outputs=tuple(TensorInfo(*spec) for spec in specs),
        fmt=decision.fmt,
        settings=settings,
        rounding=decision.rounding,
        reason=decision.reason,
    )


def _legacy_entries(source: Source, prefix: str) -> list[PlanEntry]:
    """Entries that rewrite a legacy ``scaled_fp8`` checkpoint in the comfy_quant layout."""
    infos = source.tensors()
    marker = infos[prefix + "scaled_fp8"]
    fp_matmul = marker.numel == 2  # ComfyUI's convention for "full precision matmul"
    consumed = {marker.name}
    entries: list[PlanEntry] = []
    for key, info in infos.items():
        if not (key.endswith(".scale_weight") and key.startswith(prefix)):
            continue
        layer = key[: -len(".scale_weight")]
        weight = infos.get(layer + ".weight")
        if weight is None or weight.dtype not in ("F8_E4M3", "F8_E5M2"):
            raise InputError(f"{source.name}: {layer}: scale_weight without an FP8 weight")
        if info.numel != 1:
            raise InputError(f"{source.name}: {layer}: legacy scale_weight must hold one value")
        settings: dict[str, object] = {
            "format": "float8_e4m3fn" if weight.dtype == "F8_E4M3" else "float8_e5m2"
        }
        if fp_matmul:
            settings["full_precision_matrix_mult"] = True
        inputs = [weight, info]
        input_scale = infos.get(layer + ".scale_input")
        # ComfyUI drops an input scale of exactly 1.0 (it means "not calibrated").
        with_input = input_scale is not None and _scalar(source, input_scale.name) != 1.0
        if input_scale is not None:
            inputs.append(input_scale)
        specs = comfy_quant.output_specs(
            layer,
            weight.shape,
            Format(Kind.FP8, Scaling.TENSOR),
            settings,
            with_input_scale=with_input,
        )
        outputs = [TensorInfo(*s) for s in specs]
        outputs[0] = TensorInfo(outputs[0].name, weight.dtype, weight.shape)
        consumed.update(t.name for t in inputs)
        entries.append(
            PlanEntry(
                key=weight.name,
                action=Action.UPGRADE_LEGACY,
                inputs=tuple(inputs),
                outputs=tuple(outputs),
                settings=settings,
                reason="legacy scaled_fp8 layer, codes kept as they are",
            )
        )
    for key, info in infos.items():
        if key in consumed:
            continue
        if key == marker.name:
            continue
        entries.append(PlanEntry(key, Action.KEEP, (info,), (info,), reason="not quantized"))
    entries.append(PlanEntry(marker.name, Action.DROP, (marker,), (), reason="legacy marker"))
    return entries


def _scalar(source: Source, key: str) -> float:
    return float(source.read(key).float().reshape(-1)[0])


# --- calibration (issue 4) ---------------------------------------------------------------------
# With a calibration file, a quantized layer that has statistics may also write its corrected
# bias and (FP8 per-tensor) an input_scale; both join the layer's entry so that the plan stays
# the single description of what is written (``--dry-run`` shows exactly the conversion).


def _calibrated(
    entries: list[PlanEntry], config: QuantConfig
) -> tuple[list[PlanEntry], tuple[str, ...]]:
    from .calibration import CalibrationFile, match_keys

    assert config.calibration is not None
    calib = CalibrationFile(config.calibration)
    weights = [e.key for e in entries if e.action is Action.QUANTIZE]
    matched = match_keys(weights, calib.keys())
    options = config.learned
    biases = {e.key: e for e in entries if e.action is Action.KEEP}
    merged: set[str] = set()
    out: list[PlanEntry] = []
    for e in entries:
        key = matched.get(e.key)
        if e.action is not Action.QUANTIZE or key is None:
            out.append(e)
            continue
        assert e.fmt is not None and e.settings is not None
        inputs, outputs = list(e.inputs), list(e.outputs)
        bias = biases.get(e.layer + comfy_quant.BIAS_SUFFIX)
        if (
            options.bias_correction
            and bias is not None
            and bias.inputs[0].shape == (e.inputs[0].shape[0],)
        ):
            inputs.append(bias.inputs[0])
            outputs.append(bias.outputs[0])
            merged.add(bias.key)
        if options.input_scale and e.fmt.kind is Kind.FP8 and e.fmt.scaling is Scaling.TENSOR:
            spec = comfy_quant.output_specs(
                e.layer, e.inputs[0].shape, e.fmt, e.settings, with_input_scale=True
            )[-1]
            outputs.append(TensorInfo(*spec))
        out.append(
            replace(
                e,
                inputs=tuple(inputs),
                outputs=tuple(outputs),
                reason=(e.reason + "; " if e.reason else "") + "calibrated",
                calibration=key,
            )
        )
    out = [e for e in out if e.key not in merged]
    missing = len(weights) - len(matched)
    notes = (f"calibration {calib.path.name}: statistics for {len(matched)} of {len(weights)} "
             f"quantized layers" + (f" ({missing} without)" if missing else ""),)  # fmt: skip
    return out, notes


# --- end calibration ---------------------------------------------------------------------------
