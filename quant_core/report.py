"""Per-layer results of a conversion (or of a dry run): JSON and a printable table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .plan import Action, Plan, PlanEntry
from .writer import file_size


@dataclass
class LayerReport:
    """One plan entry and, once it ran, what it measured.

    ``weight_sqnr_db`` compares the saved dequantized weight with the original;
    ``output_sqnr_db`` compares layer outputs on held-out activations (learned rounding only).
    """

    name: str
    action: str
    format: str | None
    scaling: str | None
    rounding: str | None
    shape: list[int]
    dtype: str
    bytes_before: int
    bytes_after: int
    reason: str = ""
    weight_sqnr_db: float | None = None
    output_sqnr_db: float | None = None
    time_s: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry: PlanEntry) -> LayerReport:
        first = entry.inputs[0]
        return cls(
            name=entry.layer,
            action=entry.action.value,
            format=str(entry.settings["format"]) if entry.settings else None,
            scaling=entry.fmt.label if entry.fmt else None,
            rounding=entry.rounding if entry.action is Action.QUANTIZE else None,
            shape=list(first.shape),
            dtype=first.dtype,
            bytes_before=entry.bytes_before,
            bytes_after=entry.bytes_after,
            reason=entry.reason,
        )


@dataclass
class Report:
    """Everything a user needs to judge a converted file."""

    source: str
    output: str | None
    architecture: str | None
    stock_loadable: bool
    pack_only_formats: list[str]
    layers: list[LayerReport]
    notes: list[str] = field(default_factory=list)
    elapsed_s: float | None = None
    dry_run: bool = False
    file_bytes: int | None = None  # exact size of the output file (header + data)

    @classmethod
    def from_plan(cls, plan: Plan, output: Path | None, *, dry_run: bool = False) -> Report:
        return cls(
            source=plan.source_name,
            output=str(output) if output is not None else None,
            architecture=plan.architecture,
            stock_loadable=plan.stock_loadable,
            pack_only_formats=plan.pack_only_formats,
            layers=[LayerReport.from_entry(e) for e in plan.entries],
            notes=list(plan.notes),
            dry_run=dry_run,
            file_bytes=file_size(plan.outputs, plan.metadata),
        )

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == Action.QUANTIZE.value]

    @property
    def kept_tensors(self) -> int:
        """Tensors copied unquantized (dropped ones are not kept)."""
        return sum(r.action == Action.KEEP.value for r in self.layers)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def mean_weight_sqnr_db(self) -> float | None:
        return _mean(r.weight_sqnr_db for r in self.quantized)

    @property
    def mean_output_sqnr_db(self) -> float | None:
        return _mean(r.output_sqnr_db for r in self.quantized)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["summary"] = {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "quantized_layers": len(self.quantized),
            "kept_tensors": self.kept_tensors,
            "mean_weight_sqnr_db": self.mean_weight_sqnr_db,
            "mean_output_sqnr_db": self.mean_output_sqnr_db,
        }
        return _json_safe(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    def loadability(self) -> str:
        """One sentence on whether stock ComfyUI loads the result."""
        if self.stock_loadable:
            return "loads in stock ComfyUI"
        return (
            "NEEDS the comfyui-quantizer pack installed to load in ComfyUI (pack-only formats: "
            + ", ".join(self.pack_only_formats)
            + "); stock ComfyUI refuses this file"
        )

    def table(self, *, all_layers: bool = False) -> str:
        """Fixed-width table of quantized layers (all entries with ``all_layers`` or a dry run).

        A dry run shows the plan (action, format, rounding, sizes, reason); a conversion shows
        the measured errors and times instead of the reason.
        """
        show_all = all_layers or self.dry_run
        quantize = Action.QUANTIZE.value
        rows = [r for r in self.layers if show_all or r.action not in ("keep", "drop")]
        head = ["layer", "format", "rounding", "shape", "MB before", "MB after"]
        head += ["reason"] if self.dry_run else ["W-SQNR dB", "out-SQNR dB", "s"]
        lines = []
        for r in rows:
            name = r.name
            if r.action != quantize and not self.dry_run:
                name = f"{r.name} ({r.action}: {r.reason})"
            cells = [
                name,
                r.scaling or r.format or r.action,
                r.rounding or "-",
                "x".join(map(str, r.shape)) or "scalar",
                f"{r.bytes_before / 1e6:.2f}",
                f"{r.bytes_after / 1e6:.2f}",
            ]
            if self.dry_run:
                cells.append(r.reason if r.action == quantize else f"{r.action}: {r.reason}")
            else:
                cells += [_fmt(r.weight_sqnr_db), _fmt(r.output_sqnr_db), _fmt(r.time_s, 3)]
            lines.append(cells)
        widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
        out.append("  ".join("-" * w for w in widths))
        out += [
            "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in lines
        ]
        return "\n".join(out)

    def summary(self) -> str:
        """A few lines: sizes, layer counts, mean SQNR, loadability."""
        parts = [
            f"{len(self.quantized)} layers quantized, {self.kept_tensors} tensors kept",
            f"size {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB",
        ]
        if self.mean_weight_sqnr_db is not None:
            parts.append(f"mean weight SQNR {self.mean_weight_sqnr_db:.2f} dB")
        if self.mean_output_sqnr_db is not None:
            parts.append(f"mean output SQNR {self.mean_output_sqnr_db:.2f} dB")
        if self.elapsed_s is not None:
            parts.append(f"{self.elapsed_s:.1f} s")
        lines = [
            "; ".join(parts),
            f"architecture: {self.architecture or 'not detected'}",
        ]
        if self.file_bytes is not None:
            size = f"{self.file_bytes} bytes ({self.file_bytes / 1e6:.1f} MB)"
            lines.append(("predicted file size: " if self.dry_run else "file size: ") + size)
        lines.append(("dry run: result " if self.dry_run else "result ") + self.loadability())
        lines += self.notes
        return "\n".join(lines)


def _mean(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def _json_safe(obj: object) -> object:
    """JSON has no infinity: write it as a string."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
