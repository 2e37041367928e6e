"""The one public entry point: source + config -> quantized file + report.

``quantize_model`` builds the plan, opens the streaming writer, and then handles one plan entry
at a time: read its tensors, quantize or copy them, write them, report progress, check for
cancel. Reading runs one entry ahead in a thread and writing lags behind in another, by at most
twice the largest entry's output bytes, so memory stays a constant plus a few entries' tensors.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import comfy_quant, dispatch, dtypes, formats
from .calibration import CalibrationFile
from .config import QuantConfig
from .errors import Cancelled, InputError, at
from .plan import Action, Plan, PlanEntry, build_plan
from .quantizer import quantize_layer
from .report import LayerReport, Report
from .source import Source
from .writer import StreamingWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where a conversion stands.

    After each entry: ``done`` entries finished and ``layer`` is the report of the one that just
    did. Inside a long entry (learned rounding): ``layer`` is ``None``, ``current`` is the entry
    being worked on and ``fraction`` how much of it is done.
    """

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    current: str
    layer: LayerReport | None = None
    fraction: float = 1.0

    @property
    def position(self) -> float:
        """Entries done, counting the current one's finished fraction (for progress bars)."""
        return float(self.done) if self.layer is not None else self.done + self.fraction


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
    # --- learned rounding (issue 4) ---
    learned = _LearnedContext.open(config, device, plan)
    # --- end learned rounding ---
    with (
        _no_gc(),
        _cpu_threads(config.cpu_threads),
        StreamingWriter(
            output, plan.outputs, plan.metadata, overwrite=overwrite, input_path=source.path
        ) as writer,
        _Prefetcher(source, plan.entries) as inputs,
        _BackgroundWriter(writer, 2 * plan.largest_entry_bytes) as writes,
    ):
        buffers = _CodeBuffers() if device.type == "cpu" else None
        for i, (entry, layer_report) in enumerate(zip(plan.entries, report.layers, strict=True)):
            if cancel is not None and cancel():
                raise Cancelled(f"{source.name}: cancelled; no output written")
            t0 = time.perf_counter()

            def within(
                fraction: float, i: int = i, entry: PlanEntry = entry, done_bytes: int = bytes_done
            ) -> None:
                """Progress and cancel inside a long entry (learned rounding)."""
                if cancel is not None and cancel():
                    raise Cancelled(f"{source.name}: cancelled; no output written")
                if progress is not None:
                    progress(Progress(i, len(plan.entries), done_bytes, plan.bytes_before,
                                      entry.layer, None, fraction))  # fmt: skip

            try:
                outputs = _run_entry(
                    entry, inputs.next(), config, device, layer_report, learned, within, buffers
                )
            except formats.NonFiniteWeightError:
                raise InputError(
                    f"{at(source.name, entry.layer)}: weight contains NaN or Inf"
                ) from None
            done = None
            if buffers is not None and (lent := buffers.lent()):
                done = functools.partial(buffers.give_back, lent)  # once outputs are written
            writes.submit(outputs, done=done)
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
    # --- learned rounding (issue 4) ---
    if learned is not None:
        report.notes.extend(learned.notes(report))
    # --- end learned rounding ---
    if device.type == "cpu" and any(
        layer.extra.get("quantize_backend") == "torch" for layer in report.layers
    ):
        why = dispatch.cpu_kernel_problem()
        report.notes.append(
            f"the CPU math ran on the PyTorch path ({why}); with numba installed "
            "(pip install numba) the same conversion runs 1.3-1.8x faster, same result"
        )
    report.elapsed_s = time.perf_counter() - started
    return report


class _Prefetcher:
    """Reads the next entry's tensors in a background thread while the current one computes.

    A source that offers ``map`` (a memory map; ``SafetensorsSource`` does) hands out its pages
    without a copy, faulted in by this thread; otherwise ``read`` copies. Either way the I/O
    releases the GIL and overlaps the math; it holds at most the next entry's inputs.
    """

    def __init__(self, source: Source, entries: tuple[PlanEntry, ...]) -> None:
        self._fetch = getattr(source, "map", None) or source.read
        self._entries = iter(entries)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantizer-read")
        self._pending: Future[dict[str, torch.Tensor]] | None = None

    def _read(self, entry: PlanEntry) -> dict[str, torch.Tensor]:
        return {t.name: self._fetch(t.name) for t in entry.inputs}

    def _submit(self) -> None:
        entry = next(self._entries, None)
        self._pending = None if entry is None else self._pool.submit(self._read, entry)

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
    """Writes entries' outputs in a thread, in order, while later entries compute (writes release
    the GIL). Up to ``max_bytes`` of outputs may wait: a limit in entries would let every small
    entry (a norm, a bias) stall the math until the large write before it finished. Errors
    surface at the next submit or drain; ``done`` callbacks run after an entry is written."""

    def __init__(self, writer: StreamingWriter, max_bytes: int) -> None:
        self._writer = writer
        self._max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantizer-write")
        self._pending: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._bytes = 0

    def _write(self, outputs: dict[str, torch.Tensor], done: Callable[[], None] | None) -> None:
        for name, tensor in outputs.items():
            self._writer.write(name, tensor)
        if done is not None:
            done()

    def submit(
        self, outputs: dict[str, torch.Tensor], done: Callable[[], None] | None = None
    ) -> None:
        nbytes = sum(t.nbytes for t in outputs.values())
        self._pending.append((self._pool.submit(self._write, outputs, done), nbytes))
        self._bytes += nbytes
        while self._pending and (self._bytes > self._max_bytes or self._pending[0][0].done()):
            self._wait_oldest()

    def drain(self) -> None:
        """Wait for every pending write (re-raising the first error)."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.popleft()
        self._bytes -= nbytes
        future.result()

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)  # never leave a write running past the writer's abort


class _CodeBuffers:
    """Reusable byte buffers that round-to-nearest codes are written into.

    A fresh tensor per layer costs a page fault per 4 KiB on first write: measured, a third of
    the CPU conversion's math. The buffers an entry took (``lent``) return to the free list
    (``give_back``, called by the background writer) only once its outputs are written; at most
    as many exist as entries are in flight, which ``_BackgroundWriter``'s byte limit bounds.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lent: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` in a free buffer (or a new one)."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:  # the largest free buffer (by index: == on tensors compares values)
            k = max(range(len(self._free)), key=lambda i: self._free[i].numel(), default=None)
            buf = None if k is None else self._free.pop(k)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)  # a smaller one is dropped
        self._lent.append(buf)
        return buf[:nbytes].view(dtype).view(shape)

    def lent(self) -> list[torch.Tensor]:
        """The buffers taken since the last call (the current entry's), to give back later."""
        lent, self._lent = self._lent, []
        return lent

    def give_back(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(bufs)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: every chunk creates short-lived tensors that
    trigger collections (3 % of a CPU conversion), and the pipeline makes no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily ``torch.set_num_threads(n)`` (``None``: unchanged)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_threads(n: int | None) -> contextlib.AbstractContextManager[None]:
    """With ``n`` CPU workers, run torch single-threaded inside each (``None``: leave torch alone).

    torch's own intra-op threads synchronise at every operation, which stalls badly as soon as
    the machine is busy; our chunk workers are independent of each other.
    """
    return _torch_threads(None if n is None else 1)


def _run_entry(
    entry: PlanEntry,
    inputs: dict[str, torch.Tensor],
    config: QuantConfig,
    device: torch.device,
    rep: LayerReport,
    learned: _LearnedContext | None,
    within: Callable[[float], None],
    buffers: _CodeBuffers | None,
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
    # --- learned rounding (issue 4) ---
    if learned is not None and (entry.rounding == "learned" or entry.calibration is not None):
        return learned.quantize(entry, inputs, rep, within)
    # --- end learned rounding ---
    workers = config.cpu_threads if device.type == "cpu" and config.cpu_threads else 1
    return _quantize_entry(entry, inputs, device, rep, workers=workers, buffers=buffers)


def _quantize_entry(
    entry: PlanEntry,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    rep: LayerReport,
    *,
    workers: int,
    buffers: _CodeBuffers | None,
) -> dict[str, torch.Tensor]:
    fmt = entry.fmt
    assert fmt is not None and entry.settings is not None
    weight = inputs[entry.key].to(device)
    out = None if buffers is None else buffers.take(tuple(weight.shape), fmt.code_dtype)
    codes, scale, energy, backend = dispatch.quantize_and_measure(
        weight, fmt, workers=workers, out=out
    )
    rep.weight_sqnr_db = energy.sqnr_db
    rep.extra["quantize_backend"] = backend
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


# --- learned rounding (issue 4) ----------------------------------------------------------------
class _LearnedContext:
    """What learned rounding needs across entries: the calibration file and the fallbacks."""

    def __init__(self, config: QuantConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.calibration = CalibrationFile(config.calibration) if config.calibration else None
        self.fallbacks: list[str] = []

    @classmethod
    def open(cls, config: QuantConfig, device: torch.device, plan: Plan) -> _LearnedContext | None:
        # a layer config may ask for learned rounding on some layers only
        wanted = any(e.rounding == "learned" for e in plan.entries)
        if not wanted and config.calibration is None:
            return None
        return cls(config, device)

    def _fallback(self, message: str) -> None:
        if message not in self.fallbacks:
            log.warning("%s", message)
            self.fallbacks.append(message)

    def quantize(
        self,
        entry: PlanEntry,
        inputs: dict[str, torch.Tensor],
        rep: LayerReport,
        within: Callable[[float], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        fmt = entry.fmt
        assert fmt is not None and entry.settings is not None
        weight = inputs[entry.key].to(self.device)
        stats = None
        if self.calibration is not None and entry.calibration is not None:
            stats = self.calibration.get(entry.calibration)
            if stats is not None and stats.in_features != weight.shape[1]:
                raise InputError(
                    f"{self.config.calibration}: {entry.calibration}: statistics of "
                    f"{stats.in_features} input features, but the weight {entry.layer} has "
                    f"{weight.shape[1]}"
                )
        bias_in = [t for t in entry.inputs[1:] if t.name.endswith(comfy_quant.BIAS_SUFFIX)]
        bias = inputs[bias_in[0].name].to(self.device) if bias_in else None
        # The search is matrix work: give it torch's threads (RTN chunks run one per worker).
        with _torch_threads(self.config.cpu_threads if self.device.type == "cpu" else None):
            result = quantize_layer(
                weight,
                fmt,
                rounding=entry.rounding,
                stats=stats,
                bias=bias,
                options=self.config.learned,
                seed=self.config.seed,
                hook=within,
            )
        if "learned_skipped" in result.extra:
            self._fallback(f"round-to-nearest where learned was asked: "
                           f"{result.extra['learned_skipped']} (e.g. {entry.layer})")  # fmt: skip
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
                shown = ", ".join(kept_rtn[:5]) + (" ..." if len(kept_rtn) > 5 else "")
                line += f"; the guard kept round-to-nearest for {len(kept_rtn)}: {shown}"
            lines.append(line)
        return lines


# --- end learned rounding ----------------------------------------------------------------------
