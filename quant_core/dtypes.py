"""Safetensors dtype names <-> torch dtypes, and the order safetensors writes them in."""

from __future__ import annotations

import torch

# name -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
if hasattr(torch, "float8_e8m0fnu"):
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# safetensors.torch.save_file orders tensors by this rank, largest first, then by name; the
# streaming writer follows it so that both produce the same bytes.
_WRITE_RANK = [
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "F64", "I64", "U64",
]  # fmt: skip
WRITE_RANK: dict[str, int] = {name: i for i, name in enumerate(_WRITE_RANK)}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
QUANTIZED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "I8"})


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return SAFETENSORS_DTYPES[name].itemsize


def to_torch(name: str) -> torch.dtype:
    return SAFETENSORS_DTYPES[name]


def to_safetensors(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None
