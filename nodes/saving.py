"""Save Quantized: a checked ``filename_prefix``, a fresh name, an atomic no-overwrite save.

ComfyUI's naming convention (``prefix_00001_.safetensors``, a sub-folder allowed in the prefix)
is kept. The file appears under its final name only when complete: it is hard-linked into place
(``os.link`` fails instead of replacing an existing file), either straight from the quantized
temp file when both sit on one file system (no copy at all), or from a staged copy next to the
destination. Free of ComfyUI imports so that CI tests it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from pathlib import Path, PurePosixPath

from ..quant_core import OutputError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_COUNTER = re.compile(r"_(\d{5,})_\.safetensors$")
# A Windows drive (``C:``) or UNC start is absolute on Windows even when this runs on Linux.
_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_TRIES = 10_000


def check_prefix(prefix: str) -> PurePosixPath:
    """The relative path ``prefix`` names, or ``OutputError`` saying why it may escape.

    A prefix may hold sub-folders (``quantized/flux``); it may not be empty, absolute, hold a
    ``..`` part, a NUL byte, or end with a separator. Both ``/`` and ``\\`` count as separators.
    """
    if not prefix or not prefix.strip():
        raise OutputError("filename_prefix is empty; give a file name such as 'flux_fp8'")
    if "\x00" in prefix:
        raise OutputError("filename_prefix contains a NUL byte")
    unified = prefix.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise OutputError(
            f"filename_prefix {prefix!r} is an absolute path; give a name relative to the "
            "destination folder"
        )
    parts = unified.split("/")
    if any(part == ".." for part in parts):
        raise OutputError(
            f"filename_prefix {prefix!r} contains '..' and would leave the destination folder"
        )
    if not parts[-1] or parts[-1] == ".":
        raise OutputError(f"filename_prefix {prefix!r} ends with a folder; add a file name")
    kept = [part for part in parts if part not in ("", ".")]
    return PurePosixPath(*kept)


def next_counter(folder: Path, base: str) -> int:
    """1 + the largest counter of ``base_NNNNN_.safetensors`` in ``folder`` (1 if none)."""
    if not folder.is_dir():
        return 1
    largest = 0
    for entry in os.listdir(folder):
        if entry.startswith(base + "_"):
            m = _COUNTER.search(entry)
            if m and entry[: m.start()] == base:
                largest = max(largest, int(m.group(1)))
    return largest + 1


def save_unique(result_file: Path, folder: Path, prefix: str) -> Path:
    """Put a copy of ``result_file`` in ``folder`` under a new name built from ``prefix``.

    Never replaces a file and never shows a partial one. Returns the path written.
    """
    relative = check_prefix(prefix)
    folder = Path(folder)
    root = os.path.abspath(folder)
    target_dir = Path(os.path.normpath(os.path.join(root, *relative.parent.parts)))
    # check_prefix already refused every escape; this guards the join itself.
    if os.path.commonpath([root, str(target_dir)]) != root:
        raise OutputError(f"filename_prefix {prefix!r} would leave {folder}")
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{target_dir}: cannot create folder ({e.strerror})") from None
    base = relative.name
    counter = next_counter(target_dir, base)
    link_from = Path(result_file)
    staged: Path | None = None
    try:
        for _ in range(_MAX_TRIES):
            dest = target_dir / f"{base}_{counter:05d}_{SUFFIX}"
            try:
                os.link(link_from, dest)
                return dest
            except FileExistsError:
                counter += 1
            except OSError as e:
                if staged is not None:
                    # The destination file system has no hard links at all.
                    return _claim_and_replace(staged, target_dir, base, counter, e)
                # Another file system (EXDEV) or links not allowed here: stage a copy beside.
                staged = _stage_copy(link_from, target_dir, base)
                link_from = staged
        raise OutputError(f"{target_dir}: no free name for {base!r} after {_MAX_TRIES} tries")
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)


def _stage_copy(src: Path, target_dir: Path, base: str) -> Path:
    staged = target_dir / f".{base}.{secrets.token_hex(4)}.partial"
    try:
        with open(src, "rb") as fin, open(staged, "xb") as fout:
            shutil.copyfileobj(fin, fout, length=16 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        staged.unlink(missing_ok=True)
        raise OutputError(f"{target_dir}: cannot write ({e.strerror})") from None
    return staged


def _claim_and_replace(
    staged: Path, target_dir: Path, base: str, counter: int, why: OSError
) -> Path:
    """Fallback without hard links: reserve the name with O_EXCL, then rename over it."""
    log.warning(
        "comfyui-quantizer: %s has no hard links (%s); saving by reserve-and-rename",
        target_dir,
        errno.errorcode.get(why.errno or 0, why.errno),
    )
    for _ in range(_MAX_TRIES):
        dest = target_dir / f"{base}_{counter:05d}_{SUFFIX}"
        try:
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            counter += 1
            continue
        except OSError as e:
            raise OutputError(f"{dest}: cannot write ({e.strerror})") from None
        os.replace(staged, dest)
        return dest
    raise OutputError(f"{target_dir}: no free name for {base!r} after {_MAX_TRIES} tries")
