"""Streaming safetensors writer: header first, tensors at precomputed offsets, atomic rename.

Every output tensor's name, dtype and shape is known from the plan, so the header and all
offsets are fixed before any math runs. Tensors may then arrive in any order; each is written
at its offset and dropped. The layout is the one ``safetensors.torch.save_file`` produces for
the same tensors (sorted by dtype rank, then name; header padded with spaces to 8 bytes), so
both give identical bytes. The data goes to a hidden temporary file next to the destination,
which is renamed into place only after every tensor was written and flushed; on any error or
cancel the temporary file is removed. The bytes go through ``BlockFile``, which bypasses the page
cache where the file system allows.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from . import dtypes
from .blockfile import BlockFile
from .errors import OutputError, at
from .source import TensorInfo


def layout(
    tensors: Iterable[TensorInfo], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) and ``name -> (begin, end)`` data offsets."""
    infos = list(tensors)
    names = [t.name for t in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"duplicate output tensor {dup}")
    ordered = sorted(infos, key=lambda t: (-dtypes.WRITE_RANK[t.dtype], t.name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for t in ordered:
        offsets[t.name] = (position, position + t.nbytes)
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [position, position + t.nbytes],
        }
        position += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def file_size(tensors: Iterable[TensorInfo], metadata: Mapping[str, str] | None = None) -> int:
    """Exact size of the file these tensors are written to: header plus every tensor's bytes."""
    return _size(*layout(tensors, metadata))


def _size(header: bytes, offsets: Mapping[str, tuple[int, int]]) -> int:
    return len(header) + sum(end - begin for begin, end in offsets.values())


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_destination(dest: Path, *, overwrite: bool, input_path: Path | None) -> None:
    """Refuse, before any work, a destination we must not or cannot write."""
    if input_path is not None and _same_file(dest, input_path):
        raise OutputError(f"{dest}: output path is the input file; choose another output")
    if dest.exists() and not overwrite:
        raise OutputError(f"{dest}: already exists (pass --overwrite to replace it)")
    if dest.exists() and not dest.is_file():
        raise OutputError(f"{dest}: exists and is not a regular file")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest}: folder {dest.parent} does not exist")
    if not os.access(dest.parent, os.W_OK):
        raise OutputError(f"{dest}: folder {dest.parent} is not writable")


class StreamingWriter:
    """Writes one safetensors file from a known list of tensors.

    Use as a context manager: ``write`` each tensor once (any order), then ``commit``; leaving
    the block without ``commit`` (an exception, a cancel) removes the temporary file.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        tensors: Iterable[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = False,
        input_path: Path | None = None,
    ) -> None:
        self.dest = Path(dest)
        check_destination(self.dest, overwrite=overwrite, input_path=input_path)
        self._infos = {t.name: t for t in tensors}
        self._header, self._offsets = layout(self._infos.values(), metadata)
        self._pending = set(self._infos)
        self.tmp = self.dest.with_name(f".{self.dest.name}.{secrets.token_hex(4)}.partial")
        self._file: BlockFile | None = None

    @property
    def total_bytes(self) -> int:
        return _size(self._header, self._offsets)

    def __enter__(self) -> StreamingWriter:
        try:
            self._file = BlockFile(self.tmp, self.total_bytes)
            self._file.write(0, memoryview(self._header))
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.dest}: cannot write ({e.strerror})") from None
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._file is not None or self.tmp.exists():
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor; dtype and shape must match the plan exactly."""
        if self._file is None:
            raise RuntimeError("writer is not open")
        info = self._infos.get(name)
        if info is None:
            raise ValueError(f"{name} is not in the planned output")
        if name not in self._pending:
            raise ValueError(f"{name} was already written")
        if dtypes.to_safetensors(tensor.dtype) != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(
                f"{name}: got {dtypes.to_safetensors(tensor.dtype)} {list(tensor.shape)}, "
                f"planned {info.dtype} {list(info.shape)}"
            )
        begin, _ = self._offsets[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.write(len(self._header) + begin, memoryview(data))
        except OSError as e:
            raise OutputError(f"{at(self.dest, name)}: write failed ({e.strerror})") from None
        self._pending.discard(name)

    def commit(self) -> Path:
        """Flush, then rename the temporary file to the destination. Returns the destination."""
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(
                f"{len(missing)} planned tensors were not written, e.g. {missing[0]}"
            )
        assert self._file is not None
        try:
            self._file.finish()
            self._file.close()
            self._file = None
            os.replace(self.tmp, self.dest)
        except OSError as e:
            raise OutputError(f"{self.dest}: cannot finish writing ({e.strerror})") from None
        return self.dest

    def abort(self) -> None:
        """Close and delete the temporary file (safe to call more than once)."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        self.tmp.unlink(missing_ok=True)
