"""Which tensor becomes what: the per-tensor decision the plan is built from.

This is the base rule set that applies to every model: only 2-D floating-point ``.weight``
tensors of linear layers are quantized; norms, biases, embeddings, 1-D tensors and shapes the
8-bit matmuls cannot take stay as they are, each with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import dtypes
from .config import QuantConfig
from .formats import Format
from .source import TensorInfo

# Name fragments of tensors that are never quantized, whatever the model.
_ALWAYS_KEEP = [
    (
        re.compile(r"(^|[._])(norm|ln|layernorm|layer_norm|rms_norm|norm_\w+|\w+_norm)\d*([._]|$)"),
        "norm",
    ),
    (
        re.compile(r"(^|[._])(embed|embeddings|embed_tokens|wte|wpe|shared|pos_embed)([._]|$)"),
        "embedding",
    ),
]
# 8-bit matmul kernels (cuBLASLt FP8/INT8) need both dimensions to be multiples of 16.
_MATMUL_ALIGNMENT = 16


@dataclass(frozen=True)
class Decision:
    """Quantize with ``fmt``, or keep (``fmt is None``) with a ``reason``."""

    fmt: Format | None
    reason: str = ""
    rounding: str = "nearest"


def decide(info: TensorInfo, config: QuantConfig) -> Decision:
    """The base decision for one tensor of the source."""
    if info.dtype not in dtypes.FLOAT_DTYPES:
        return Decision(None, f"{info.dtype} tensor (not floating point)")
    if not info.name.endswith(".weight"):
        return Decision(None, "not a layer weight")
    if len(info.shape) != 2:
        return Decision(None, f"{len(info.shape)}-D tensor (only 2-D linear weights are quantized)")
    for pattern, what in _ALWAYS_KEEP:
        if pattern.search(info.name.lower()):
            return Decision(None, f"{what} (kept in high precision)")
    out_features, in_features = info.shape
    if out_features % _MATMUL_ALIGNMENT or in_features % _MATMUL_ALIGNMENT:
        return Decision(
            None,
            f"shape {list(info.shape)} is not a multiple of {_MATMUL_ALIGNMENT} (8-bit matmul)",
        )
    return Decision(config.format, rounding=config.rounding)
