"""The one public entry point: source + config -> quantized file + report.

``quantize_model`` builds the plan, opens the streaming writer, and then handles one plan entry
at a time: read its tensors, quantize or copy them, write them, report progress, check for
cancel. Only one entry's tensors are alive at a time.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import comfy_quant, dispatch, dtypes, formats
from .config import QuantConfig
from .errors import Cancelled, InputError, at
from .plan import Action, Plan, PlanEntry, build_plan
from .report import LayerReport, Report
from .source import Source
from .writer import StreamingWriter


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
    started = time.perf_counter()
    bytes_done = 0
    with (
        _cpu_threads(config.cpu_threads),
        StreamingWriter(
            output, plan.outputs, plan.metadata, overwrite=overwrite, input_path=source.path
        ) as writer,
        _Prefetcher(source, plan.entries) as inputs,
        _BackgroundWriter(writer) as writes,
    ):
        for i, (entry, layer_report) in enumerate(zip(plan.entries, report.layers, strict=True)):
            if cancel is not None and cancel():
                raise Cancelled(f"{source.name}: cancelled; no output written")
            t0 = time.perf_counter()
            try:
                outputs = _run_entry(entry, inputs.next(), config, device, layer_report)
            except formats.NonFiniteWeightError:
                raise InputError(
                    f"{at(source.name, entry.layer)}: weight contains NaN or Inf"
                ) from None
            for name, tensor in outputs.items():
                writer.write(name, tensor)
            del outputs
            layer_report.time_s = time.perf_counter() - t0
            bytes_done += entry.bytes_before
            if progress is not None:
                progress(
                    Progress(
                        i + 1,
                        len(plan.entries),
                        bytes_done,
                        plan.bytes_before,
                        entry.layer,
                        layer_report,
                    )
                )
        if cancel is not None and cancel():
            raise Cancelled(f"{source.name}: cancelled; no output written")
        writes.drain()
        writer.commit()
    report.elapsed_s = time.perf_counter() - started
    return report


class _Prefetcher:
    """Reads the next entry's tensors in a background thread while the current one computes.

    Reading releases the GIL, so I/O overlaps the math. Sources that accept a ``buffer`` read
    into a ring of three reusable slots, so no fresh memory is faulted in per tensor. Entry
    ``i``'s slot is refilled for entry ``i + 3``, whose read starts when entry ``i + 2`` is
    handed out; by then entry ``i``'s outputs (which may be views of its inputs) were written,
    because the background writer drains entry ``i`` when entry ``i + 1`` is submitted.
    """

    def __init__(self, source: Source, entries: tuple[PlanEntry, ...]) -> None:
        self._source = source
        self._entries = iter(entries)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantizer-read")
        self._pending: Future[dict[str, torch.Tensor]] | None = None
        self._buffered = "buffer" in inspect.signature(source.read).parameters
        self._slots = [torch.empty(0, dtype=torch.uint8) for _ in range(3)]
        self._turn = 0

    def _read(self, entry: PlanEntry, slot: int) -> dict[str, torch.Tensor]:
        if not self._buffered:
            return {t.name: self._source.read(t.name) for t in entry.inputs}
        need = sum(_aligned(t.nbytes) for t in entry.inputs)
        if self._slots[slot].numel() < need:
            self._slots[slot] = torch.empty(need, dtype=torch.uint8)
        out, offset = {}, 0
        for t in entry.inputs:
            view = self._slots[slot][offset : offset + t.nbytes]
            out[t.name] = self._source.read(t.name, buffer=view)  # type: ignore[call-arg]
            offset += _aligned(t.nbytes)
        return out

    def _submit(self) -> None:
        entry = next(self._entries, None)
        self._turn = (self._turn + 1) % len(self._slots)
        self._pending = None if entry is None else self._pool.submit(self._read, entry, self._turn)

    def __enter__(self) -> _Prefetcher:
        self._submit()
        return self

    def next(self) -> dict[str, torch.Tensor]:
        """The inputs of the next entry, in plan order (and start reading the one after)."""
        assert self._pending is not None, "more entries requested than planned"
        tensors = self._pending.result()
        self._submit()
        return tensors

    def __exit__(self, *exc: object) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pool.shutdown(wait=True)


class _BackgroundWriter:
    """Writes one entry's outputs in a thread while the next entry computes (writes release
    the GIL). At most one entry's outputs wait; errors surface at the next submit or drain."""

    def __init__(self, writer: StreamingWriter) -> None:
        self._writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantizer-write")
        self._pending: Future[None] | None = None

    def _write(self, outputs: dict[str, torch.Tensor]) -> None:
        for name, tensor in outputs.items():
            self._writer.write(name, tensor)

    def submit(self, outputs: dict[str, torch.Tensor]) -> None:
        self.drain()
        self._pending = self._pool.submit(self._write, outputs)

    def drain(self) -> None:
        """Wait for the pending write (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)  # never leave a write running past the writer's abort


def _aligned(n: int) -> int:
    """Round up to 64 bytes so that every tensor view in a slot is well aligned."""
    return (n + 63) // 64 * 64


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """With ``n`` CPU workers, run torch single-threaded inside each (``None``: leave torch alone).

    torch's own intra-op threads synchronise at every operation, which stalls badly as soon as
    the machine is busy; our chunk workers are independent of each other.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_entry(
    entry: PlanEntry,
    inputs: dict[str, torch.Tensor],
    config: QuantConfig,
    device: torch.device,
    rep: LayerReport,
) -> dict[str, torch.Tensor]:
    """The output tensors of one plan entry (updates ``rep`` with what it measured)."""
    if entry.action is Action.DROP:
        return {}
    if entry.action is Action.KEEP:
        out = entry.outputs[0]
        tensor = inputs[entry.key]
        if out.dtype != entry.inputs[0].dtype:
            tensor = tensor.to(dtypes.to_torch(out.dtype))  # the plan's dtype, overrides included
        return {out.name: tensor}
    if entry.action is Action.UPGRADE_LEGACY:
        return _upgrade_legacy(entry, inputs)
    workers = config.cpu_threads if device.type == "cpu" and config.cpu_threads else 1
    return _quantize_entry(entry, inputs, device, rep, workers=workers)


def _quantize_entry(
    entry: PlanEntry,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    rep: LayerReport,
    *,
    workers: int = 1,
) -> dict[str, torch.Tensor]:
    fmt = entry.fmt
    assert fmt is not None and entry.settings is not None
    weight = inputs[entry.key].to(device)
    # --- kernels (issue 5): on CUDA, RTN goes through the dispatcher (Triton if usable) ---
    if weight.is_cuda:
        rep.extra["quantize_backend"] = dispatch.choose_quantize(weight, fmt).backend
        codes, scale = dispatch.quantize(weight, fmt)
        rep.weight_sqnr_db = formats.error_energy(weight, codes, scale, fmt).sqnr_db
        return comfy_quant.layer_tensors(entry.layer, codes, scale, entry.settings)
    # --- end kernels ---
    codes, scale, energy = formats.quantize_and_measure(weight, fmt, workers=workers)
    rep.weight_sqnr_db = energy.sqnr_db
    return comfy_quant.layer_tensors(entry.layer, codes, scale, entry.settings)


def _upgrade_legacy(entry: PlanEntry, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite one legacy scaled_fp8 layer: same codes, scales renamed (lossless)."""
    assert entry.settings is not None
    weight = inputs[entry.inputs[0].name]
    scale = inputs[entry.inputs[1].name].float().reshape(())
    wants_input = any(t.name.endswith(comfy_quant.INPUT_SCALE_SUFFIX) for t in entry.outputs)
    input_scale = inputs[entry.inputs[2].name].float() if wants_input else None
    return comfy_quant.layer_tensors(
        entry.layer, weight, scale, entry.settings, input_scale=input_scale
    )
