"""StreamingWriter: the same bytes as safetensors.save_file, atomic, and nothing left on failure."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_quantizer.quant_core import OutputError, TensorInfo
from comfyui_quantizer.quant_core.dtypes import to_safetensors
from comfyui_quantizer.quant_core.writer import StreamingWriter, layout


def info(name: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, to_safetensors(t.dtype), tuple(t.shape))


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z.weight": torch.randn(8, 4, generator=g).to(torch.float8_e4m3fn),
        "a.weight": torch.randint(-127, 128, (3, 5), generator=g, dtype=torch.int8),
        "a.weight_scale": torch.rand(3, 1, generator=g),
        "b.scale": torch.tensor(0.5),
        "c.comfy_quant": torch.tensor(list(b'{"format":"int8_tensorwise"}'), dtype=torch.uint8),
        "bf": torch.randn(7, generator=g).to(torch.bfloat16),
        "h": torch.randn(2, 2, generator=g).to(torch.float16),
        "i64": torch.arange(3),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "e5": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "flag": torch.tensor([True, False]),
        "empty": torch.ones(0, 3),
    }


def test_exact_bytes_of_a_small_file(tmp_path: Path) -> None:
    dest = tmp_path / "one.safetensors"
    t = torch.tensor([1.0])
    with StreamingWriter(dest, [info("a", t)]) as w:
        w.write("a", t)
        w.commit()
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}  '
    assert dest.read_bytes() == struct.pack("<Q", len(header)) + header + b"\x00\x00\x80?"


@pytest.mark.parametrize("metadata", [None, {"title": "ünï"}, {"k": "v", "title": "ünï", "a": "1"}])
def test_same_bytes_as_save_file_in_any_write_order(tmp_path: Path, metadata) -> None:
    tensors = mixed_tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata=metadata)
    dest = tmp_path / "ours.safetensors"
    names = list(tensors)
    random.Random(1).shuffle(names)
    with StreamingWriter(dest, [info(k, v) for k, v in tensors.items()], metadata) as w:
        for name in names:
            w.write(name, tensors[name])
        w.commit()
    ours, theirs = dest.read_bytes(), ref.read_bytes()
    if metadata is None or len(metadata) < 2:
        assert ours == theirs
    else:
        # safetensors writes metadata keys in a per-process random (hash) order; we keep the
        # caller's order. Everything else must match byte for byte.
        n = struct.unpack("<Q", ours[:8])[0]
        assert struct.unpack("<Q", theirs[:8])[0] == n
        assert json.loads(ours[8 : 8 + n]) == json.loads(theirs[8 : 8 + n])
        assert ours[8 + n :] == theirs[8 + n :]


def test_layout_predicts_the_exact_file_size(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    header, offsets = layout([info(k, v) for k, v in tensors.items()], {"m": "x"})
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"m": "x"})
    assert len(header) + max(end for _, end in offsets.values()) == ref.stat().st_size


def test_refuses_mismatched_tensors_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    t = torch.ones(2, 2)
    with pytest.raises(ValueError, match="planned F32"), StreamingWriter(dest, [info("a", t)]) as w:
        w.write("a", torch.ones(2, 3))
    with (
        pytest.raises(ValueError, match="not in the planned"),
        StreamingWriter(dest, [info("a", t)]) as w,
    ):
        w.write("b", t)
    with (
        pytest.raises(RuntimeError, match="not written"),
        StreamingWriter(dest, [info("a", t)]) as w,
    ):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_exception_mid_write_removes_the_temporary_file(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    t = torch.ones(4)
    with pytest.raises(KeyboardInterrupt), StreamingWriter(dest, [info("a", t), info("b", t)]) as w:
        w.write("a", t)
        assert w.tmp.exists() and not dest.exists()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_destination_checks(tmp_path: Path) -> None:
    t = torch.ones(1)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        StreamingWriter(existing, [info("a", t)])
    with pytest.raises(OutputError, match="is the input"):
        StreamingWriter(
            existing,
            [info("a", t)],
            overwrite=True,
            input_path=tmp_path / "." / "exists.safetensors",
        )
    with pytest.raises(OutputError, match="does not exist"):
        StreamingWriter(tmp_path / "nope" / "x.safetensors", [info("a", t)])
    assert existing.read_bytes() == b"keep me"
    with StreamingWriter(existing, [info("a", t)], overwrite=True) as w:
        w.write("a", t)
        w.commit()
    assert existing.read_bytes() != b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.safetensors"]
