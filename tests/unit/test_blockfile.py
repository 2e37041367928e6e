"""BlockFile: write-once positional writes through O_DIRECT blocks (or the buffered fallback)."""

from __future__ import annotations

import random

import pytest

from comfyui_quantizer.quant_core.blockfile import ALIGN, BlockFile


def _pieces(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Cut [0, size) into pieces of mixed lengths: tiny, sub-block, block-straddling, huge."""
    cuts, at = [], 0
    while at < size:
        n = min(size - at, rng.choice([1, 7, ALIGN - 3, ALIGN, ALIGN + 5, 3 * ALIGN, 70_001]))
        cuts.append((at, n))
        at += n
    return cuts


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [1, ALIGN, 5 * ALIGN + 123, 300_000])
def test_any_order_gives_the_exact_bytes(tmp_path, direct: bool, size: int) -> None:
    rng = random.Random(size)
    expected = rng.randbytes(size)
    pieces = _pieces(size, rng)
    rng.shuffle(pieces)
    path = tmp_path / "f.bin"
    f = BlockFile(path, size, direct=direct)
    try:
        for at, n in pieces:
            f.write(at, memoryview(expected)[at : at + n])
        f.finish()
    finally:
        f.close()
    assert path.read_bytes() == expected


def test_refuses_out_of_range_and_incomplete_files(tmp_path) -> None:
    f = BlockFile(tmp_path / "f.bin", 2 * ALIGN)
    try:
        with pytest.raises(ValueError, match="outside"):
            f.write(ALIGN + 1, memoryview(bytes(ALIGN)))
        f.write(0, memoryview(bytes(ALIGN + 10)))
        with pytest.raises(RuntimeError, match="never completed"):
            f.finish()
    finally:
        f.close()


def test_refuses_an_existing_file(tmp_path) -> None:
    (tmp_path / "f.bin").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        BlockFile(tmp_path / "f.bin", 10)
    assert (tmp_path / "f.bin").read_bytes() == b"keep"
