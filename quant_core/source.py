"""Model sources: keys, shapes, dtypes and metadata up front; tensors read one at a time.

``SafetensorsSource`` parses and validates the header itself (the ``safetensors`` library would
map the whole file) and reads each tensor with one ``readinto`` into fresh memory, so peak RAM is
one tensor, whatever the model size, and nothing is left in the process's RSS afterwards.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from . import dtypes
from .errors import InputError, at

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Name, safetensors dtype name (``BF16``, ``F8_E4M3``, ...) and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@runtime_checkable
class Source(Protocol):
    """What the pipeline needs from a model: a lazy, ordered view of named tensors."""

    @property
    def name(self) -> str:
        """Shown in messages and reports (a file path, or a graph node's description)."""
        ...

    @property
    def path(self) -> Path | None:
        """The file behind the source, if any (the writer refuses to overwrite it)."""
        ...

    @property
    def metadata(self) -> Mapping[str, str]:
        """Header metadata (``__metadata__``) to carry into the output."""
        ...

    def tensors(self) -> Mapping[str, TensorInfo]:
        """All tensors, in file order, without reading any data."""
        ...

    def read(self, key: str) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype.

        A source may also offer ``map(key)``: the same tensor without a copy (a memory map);
        the pipeline prefers it when offered.
        """
        ...


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    begin: int  # absolute file offset
    end: int


def _parse_header(path: Path, raw: bytes, file_size: int) -> tuple[dict[str, str], list[_Entry]]:
    """Validate a safetensors header (already read) against the file size."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"{path}: not a safetensors file (header is not valid JSON: {e})"
        ) from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(f"{path}: malformed __metadata__ (must map strings to strings)")

    data_start = 8 + len(raw)
    data_size = file_size - data_start
    entries: list[_Entry] = []
    for key, spec in header.items():
        if not isinstance(spec, dict):
            raise InputError(f"{at(path, key)}: malformed header entry")
        dtype = spec.get("dtype")
        shape = spec.get("shape")
        offsets = spec.get("data_offsets")
        if dtype not in dtypes.SAFETENSORS_DTYPES:
            raise InputError(f"{at(path, key)}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InputError(f"{at(path, key)}: malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InputError(f"{at(path, key)}: malformed data_offsets {offsets!r}")
        begin, end = offsets
        info = TensorInfo(key, dtype, tuple(shape))
        if not 0 <= begin <= end <= data_size:
            raise InputError(
                f"{at(path, key)}: data_offsets [{begin}, {end}] out of range "
                f"(the data section has {data_size} bytes; truncated file?)"
            )
        if end - begin != info.nbytes:
            raise InputError(
                f"{at(path, key)}: data_offsets span {end - begin} bytes but dtype {dtype} "
                f"and shape {list(shape)} need {info.nbytes}"
            )
        entries.append(_Entry(info, data_start + begin, data_start + end))

    # The data section must be covered exactly once: no overlaps, no holes.
    position = data_start
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin < position:
            raise InputError(f"{at(path, entry.info.name)}: data overlaps another tensor")
        if entry.begin > position:
            raise InputError(f"{at(path, entry.info.name)}: unused bytes before this tensor's data")
        position = entry.end
    if position != file_size:
        raise InputError(f"{path}: {file_size - position} bytes after the last tensor")
    return metadata, entries


class SafetensorsSource:
    """A ``.safetensors`` file, read lazily. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        if not self._path.exists():
            raise InputError(f"{self._path}: no such file")
        if not self._path.is_file():
            raise InputError(f"{self._path}: not a regular file")
        try:
            self._file = open(self._path, "rb")  # noqa: SIM115 - kept open for lazy reads
        except OSError as e:
            raise InputError(f"{self._path}: cannot open ({e.strerror})") from None
        try:
            self._metadata, entries = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._entries = {e.info.name: e for e in entries}
        self._infos = {e.info.name: e.info for e in sorted(entries, key=lambda e: e.begin)}

    def _read_header(self) -> tuple[dict[str, str], list[_Entry]]:
        file_size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise InputError(f"{self._path}: not a safetensors file (only {file_size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise InputError(
                f"{self._path}: not a safetensors file or truncated (header length {header_len} "
                f"exceeds the file size {file_size})"
            )
        if header_len > MAX_HEADER_BYTES:
            raise InputError(f"{self._path}: header of {header_len} bytes is too large")
        raw = self._file.read(header_len)
        return _parse_header(self._path, raw, file_size)

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def metadata(self) -> Mapping[str, str]:
        return dict(self._metadata)

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, key: str) -> torch.Tensor:
        """One tensor, copied into fresh memory."""
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(key)
        info = entry.info
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._file.seek(entry.begin)
            got = self._file.readinto(memoryview(raw.numpy()))
            if got != info.nbytes:
                raise InputError(f"{at(self._path, key)}: file ended while reading (truncated?)")
        return raw.view(dtypes.to_torch(info.dtype)).reshape(info.shape)

    def map(self, key: str) -> torch.Tensor:
        """One tensor as a copy-on-write memory map of the file (no copy of the data; the pages
        are faulted in here, so a reader thread does the I/O). Unmapped when the tensor dies.
        Falls back to :meth:`read` when the data is not aligned for its dtype."""
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(key)
        info = entry.info
        dtype = dtypes.to_torch(info.dtype)
        if info.nbytes == 0 or entry.begin % dtype.itemsize or not hasattr(mmap, "MAP_PRIVATE"):
            return self.read(key)  # nothing to map, misaligned, or Windows
        start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
        if entry.end > os.fstat(self._file.fileno()).st_size:  # the file shrank under us
            raise InputError(f"{at(self._path, key)}: file ended while reading (truncated?)")
        try:
            mapped = mmap.mmap(
                self._file.fileno(), entry.end - start, flags=mmap.MAP_PRIVATE, offset=start
            )
        except (OSError, ValueError):
            return self.read(key)
        _populate_read(mapped)
        with warnings.catch_warnings():  # a private (copy-on-write) map is writable anyway
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes,
                                   offset=entry.begin - start)  # fmt: skip
        return raw.view(dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)


# Linux >= 5.14 (Python >= 3.13 names it); elsewhere the fallback below.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def _populate_read(mapped: mmap.mmap) -> None:
    """Fault a private map's pages in for reading, here (the reader thread) rather than in the math.

    Not ``MAP_POPULATE``: on a writable private map it breaks copy-on-write up front, copying the
    whole tensor into fresh memory. Read faults share the page cache's pages; a page is copied only
    if someone writes to it. Without ``MADV_POPULATE_READ`` one read per page does the same."""
    if _MADV_POPULATE_READ is not None:
        try:
            mapped.madvise(_MADV_POPULATE_READ)
            return
        except (OSError, ValueError):
            pass  # an older kernel
    sum(memoryview(mapped)[:: mmap.PAGESIZE])  # reads one byte of every page


def describe_existing_quantization(source: Source) -> str | None:
    """Why ``source`` is already quantized (``None`` if it is not).

    Recognises comfy_quant layers, the ``_quantization_metadata`` header, the legacy
    ``scaled_fp8`` layout and 8-bit weights that carry a scale.
    """
    infos = source.tensors()
    comfy = [k for k in infos if k.endswith(".comfy_quant")]
    if comfy:
        example = comfy[0][: -len(".comfy_quant")]
        return f"it already has {len(comfy)} comfy_quant layer(s), e.g. {example}"
    if "_quantization_metadata" in source.metadata:
        return "its header already carries _quantization_metadata"
    if legacy_scaled_fp8_prefix(source) is not None:
        return "it is a legacy scaled_fp8 checkpoint"
    for key, info in infos.items():
        if info.dtype in dtypes.QUANTIZED_DTYPES and key.endswith(".weight"):
            return f"{key} is already stored as {info.dtype}"
    return None


def legacy_scaled_fp8_prefix(source: Source) -> str | None:
    """Model prefix of a legacy ``scaled_fp8`` checkpoint (marker key ``<prefix>scaled_fp8``)."""
    for key in source.tensors():
        if key == "scaled_fp8" or key.endswith(".scaled_fp8"):
            return key[: -len("scaled_fp8")]
    return None
