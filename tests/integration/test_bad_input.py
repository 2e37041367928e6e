"""Bad input: one clear line naming the file (and layer), non-zero exit, no file left behind."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from comfyui_quantizer.cli import main
from comfyui_quantizer.quant_core import Cancelled, QuantConfig, SafetensorsSource, quantize_model


def _raw(path: Path, header: object, data: bytes, length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def _text(path: Path) -> Path:
    path.write_text("this is a text file, not a model")
    return path


F32 = {"dtype": "F32", "shape": [16, 16], "data_offsets": [0, 1024]}
ZEROS = b"\0" * 1024


def _nan_model(d: Path, write_model) -> Path:
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    return write_model(
        {"ok.weight": torch.randn(32, 32), "blocks.1.bad.weight": w}, name="n.safetensors"
    )


def _quantized(d: Path, write_model) -> Path:
    conf = torch.tensor(list(b'{"format":"float8_e4m3fn"}'), dtype=torch.uint8)
    codes = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    state = {"a.weight": codes, "a.weight_scale": torch.tensor(1.0), "a.comfy_quant": conf}
    return write_model(state, name="q.safetensors")


BAD: dict[str, tuple[Callable[[Path, Callable], Path], str]] = {
    "not-safetensors": (lambda d, w: _text(d / "a.safetensors"), "not a safetensors file"),
    "truncated": (lambda d, w: _raw(d / "t.st", {"x.weight": F32}, ZEROS[:500]), "out of range"),
    "header-too-long": (
        lambda d, w: _raw(d / "h.safetensors", {"x.weight": F32}, ZEROS, 1 << 40), "header length"),
    "malformed-json": (
        lambda d, w: _raw(d / "j.safetensors", {"x.weight": F32}, ZEROS, 9), "not valid JSON"),
    "overlapping-offsets": (
        lambda d, w: _raw(d / "o.st", {"a.weight": F32, "b.weight": F32}, ZEROS), "overlaps"),
    "offsets-out-of-range": (
        lambda d, w: _raw(d / "r.st", {"a.weight": {**F32, "data_offsets": [1024, 2048]}}, ZEROS),
        "out of range"),
    "unknown-dtype": (
        lambda d, w: _raw(d / "u.st", {"a.weight": {**F32, "dtype": "F12"}}, ZEROS),
        "unknown dtype"),
    "already-quantized": (_quantized, "already quantized"),
    "nan-weight": (_nan_model, "blocks.1.bad: weight contains NaN or Inf"),
    "missing-input": (lambda d, w: d / "does-not-exist.safetensors", "no such file"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_cleanly(tmp_path: Path, write_model, case: str, capsys) -> None:
    make, message = BAD[case]
    src = make(tmp_path, write_model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["-i", str(src), "-o", str(out_dir / "result.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"comfy-quantize: error: {src}")
    assert message in lines[0]
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # no output, no temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_output_equal_to_input_is_refused(tiny_model: Path, capsys) -> None:
    original = tiny_model.read_bytes()
    for flags in ([], ["--overwrite"]):
        assert main(["-i", str(tiny_model), "-o", str(tiny_model), "--no-progress", *flags]) == 1
        err = capsys.readouterr().err
        assert "output path is the input file" in err and "Traceback" not in err
    assert tiny_model.read_bytes() == original
    assert [p.name for p in tiny_model.parent.iterdir()] == [tiny_model.name]


def test_verbose_shows_the_traceback(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_text("nope")
    assert main(["-i", str(bad), "-o", str(tmp_path / "o.safetensors"), "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_invalid_options_fail_before_work(tiny_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.safetensors"
    assert (
        main(
            ["-i", str(tiny_model), "-o", str(out), "--block_size", "0", "--scaling-mode", "block"]
        )
        == 1
    )
    assert "block size must be between 1 and 4096" in capsys.readouterr().err
    assert main(["-i", str(tiny_model), "-o", str(out), "--device", "tpu:x"]) == 1
    assert "unknown device" in capsys.readouterr().err
    assert not out.exists()


def test_cancel_leaves_no_file(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "cancelled.safetensors"
    seen: list[int] = []
    with SafetensorsSource(tiny_model) as src, pytest.raises(Cancelled):
        quantize_model(
            src,
            QuantConfig(),
            out,
            progress=lambda p: seen.append(p.done),
            cancel=lambda: len(seen) >= 3,
        )
    assert seen == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny_model.name]


def test_progress_reports_every_entry_in_bytes(tiny_model: Path, tmp_path: Path) -> None:
    events = []
    with SafetensorsSource(tiny_model) as src:
        report = quantize_model(
            src, QuantConfig(), tmp_path / "o.safetensors", progress=events.append
        )
        total = sum(t.nbytes for t in src.tensors().values())
    assert [e.done for e in events] == list(range(1, len(report.layers) + 1))
    assert all(e.total == len(report.layers) and e.bytes_total == total for e in events)
    assert [e.bytes_done for e in events] == sorted(e.bytes_done for e in events)
    assert events[-1].bytes_done == total
    assert {e.layer.name for e in events} == {r.name for r in report.layers}
