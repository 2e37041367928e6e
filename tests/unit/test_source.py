"""SafetensorsSource: lazy reads equal the safetensors library's; malformed files are refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_quantizer.quant_core import InputError, SafetensorsSource
from comfyui_quantizer.quant_core.source import describe_existing_quantization


def raw_file(path: Path, header: dict, data: bytes = b"", *, length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def test_reads_every_tensor_exactly_like_safetensors(tiny_model: Path) -> None:
    expected = load_file(str(tiny_model))
    with SafetensorsSource(tiny_model) as src:
        assert set(src.tensors()) == set(expected)
        for key, ref in expected.items():
            info = src.tensors()[key]
            got = src.read(key)
            assert got.dtype == ref.dtype and tuple(got.shape) == info.shape == tuple(ref.shape)
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
        assert src.metadata == {"modelspec.title": "tiny", "note": "ünïcode"}


def test_tensor_order_is_file_order(write_model) -> None:
    path = write_model({"b": torch.ones(3), "a": torch.ones(2, dtype=torch.int8)})
    with SafetensorsSource(path) as src:
        # safetensors writes F32 before I8: file order, not name order.
        assert list(src.tensors()) == ["b", "a"]


def test_zero_sized_and_scalar_tensors(write_model) -> None:
    path = write_model({"empty": torch.ones(0, 4), "scalar": torch.tensor(2.5)})
    with SafetensorsSource(path) as src:
        assert src.read("empty").shape == (0, 4)
        assert src.read("scalar").item() == 2.5


def spec(dtype: str = "F32", shape: object = (4,), offsets: object = (0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


Z = b"\0"
F32_4 = spec()


@pytest.mark.parametrize(
    ("header", "data", "length", "message", "tensor"),
    [
        ({"t": F32_4}, Z * 8, None, "out of range", "t"),  # truncated data
        ({"t": F32_4}, Z * 16, 10_000, "header length", None),
        ({"t": spec(offsets=(0, 12))}, Z * 12, None, "need 16", "t"),
        ({"t": spec(dtype="Q4")}, Z * 16, None, "unknown dtype", "t"),
        ({"t": spec(shape=(-4,))}, Z * 16, None, "shape", "t"),
        ({"t": spec(offsets=(0,))}, Z * 16, None, "data_offsets", "t"),
        ({"a": F32_4, "b": spec(offsets=(8, 24))}, Z * 24, None, "overlaps", "b"),
        ({"t": spec(offsets=(4, 20))}, Z * 20, None, "unused", "t"),
        ({"t": F32_4}, Z * 20, None, "after the last tensor", None),
        ({"__metadata__": {"a": 1}, "t": F32_4}, Z * 16, None, "__metadata__", None),
        ([1, 2], b"", None, "not a JSON object", None),
        ({"t": F32_4}, b"", 3, "not valid JSON", None),
    ],
    ids=["truncated", "header-too-long", "size-mismatch", "unknown-dtype", "negative-shape",
         "bad-offsets", "overlap", "hole", "trailing-bytes", "bad-metadata", "not-object",
         "bad-json"],
)  # fmt: skip
def test_malformed_files_are_refused_naming_file_and_tensor(
    tmp_path: Path, header, data: bytes, length: int | None, message: str, tensor: str | None
) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(InputError, match=message) as err:
        SafetensorsSource(path)
    assert str(err.value).startswith(f"{path}: ")
    if tensor is not None:
        assert str(err.value).startswith(f"{path}: {tensor}: ")


def test_not_safetensors_and_missing_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(InputError, match="not a safetensors file"):
        SafetensorsSource(text)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="only 2 bytes"):
        SafetensorsSource(tiny)
    with pytest.raises(InputError, match="no such file"):
        SafetensorsSource(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="not a regular file"):
        SafetensorsSource(tmp_path)


def test_recognises_already_quantized_inputs(write_model, tiny_state) -> None:
    plain = write_model(tiny_state(), name="plain.safetensors")
    comfy = write_model(
        {
            "a.weight": torch.zeros(4, 4, dtype=torch.int8),
            "a.comfy_quant": torch.tensor([123], dtype=torch.uint8),
        },
        name="comfy.safetensors",
    )
    legacy = write_model(
        {"m.scaled_fp8": torch.zeros(1), "m.a.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
         "m.a.scale_weight": torch.ones(1)},
        name="legacy.safetensors",
    )  # fmt: skip
    bare = write_model(
        {"a.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}, name="bare.safetensors"
    )
    with SafetensorsSource(plain) as src:
        assert describe_existing_quantization(src) is None
    for path, words in [(comfy, "comfy_quant"), (legacy, "scaled_fp8"), (bare, "F8_E4M3")]:
        with SafetensorsSource(path) as src:
            assert words in describe_existing_quantization(src)
