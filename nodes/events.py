"""What the Quantize node tells the browser: websocket event names and their JSON payloads.

``web/quantizer.js`` listens for these events (``api.addEventListener``) and renders the live
per-layer table and the final summary on the node. Every payload carries ``node`` (the graph
node id) so that each Quantize node only shows its own run. Free of ComfyUI imports.
"""

from __future__ import annotations

import math

from ..quant_core import LayerReport, Progress, Report

EVENT_START = "comfyui_quantizer.start"
EVENT_LAYER = "comfyui_quantizer.layer"
EVENT_DONE = "comfyui_quantizer.done"
UI_KEY = "comfyui_quantizer"  # key of the node's ``ui`` output (restores the view on reload)

QUANTIZED = "quantize"  # LayerReport.action of a quantized entry


def start_payload(node: str, *, source: str, fmt: str) -> dict[str, object]:
    """A run begins: the view clears its table."""
    return {"node": node, "source": source, "format": fmt}


def layer_row(layer: LayerReport) -> dict[str, object]:
    """One table row: layer, format, SQNR (output-space when measured) and time."""
    return {
        "layer": layer.name,
        "format": layer.scaling or layer.format or layer.action,
        "output_sqnr_db": _db(layer.output_sqnr_db),
        "weight_sqnr_db": _db(layer.weight_sqnr_db),
        "time_ms": None if layer.time_s is None else round(layer.time_s * 1e3, 2),
    }


def layer_payload(node: str, progress: Progress) -> dict[str, object]:
    """Progress after one plan entry; ``row`` only for entries that were quantized."""
    layer = progress.layer
    row = layer_row(layer) if layer is not None and layer.action == QUANTIZED else None
    return {
        "node": node,
        "done": progress.done,
        "position": progress.position,
        "total": progress.total,
        "current": progress.current,
        "row": row,
    }


def summary_payload(node: str, report: Report) -> dict[str, object]:
    """The final summary and the whole table (also stored as the node's ``ui`` output)."""
    quantized = report.quantized
    return {
        "node": node,
        "source": report.source,
        "architecture": report.architecture,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "quantized_layers": len(quantized),
        "kept_tensors": report.kept_tensors,
        "mean_output_sqnr_db": _db(report.mean_output_sqnr_db),
        "mean_weight_sqnr_db": _db(report.mean_weight_sqnr_db),
        "stock_loadable": report.stock_loadable,
        "loadability": report.loadability(),
        "elapsed_s": None if report.elapsed_s is None else round(report.elapsed_s, 3),
        "notes": list(report.notes),
        "rows": [layer_row(r) for r in quantized],
    }


def _db(value: float | None) -> float | str | None:
    """A decibel value for JSON, which has no infinity: an exact layer is sent as ``"inf"``."""
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return round(value, 3)
