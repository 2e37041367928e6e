"""Shared test helpers: tiny safetensors files written by the safetensors library itself."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import save_file

# --- kernels (issue 5) --------------------------------------------------------------------------
# Without CUDA, Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET=1 must be set
# before triton is first imported (by any test module or library, e.g. comfy-kitchen): triton's
# own tl.* helpers are jit functions defined at import. No other code path runs Triton on CPU,
# so nothing else changes; with a CUDA device nothing is set.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# --- end kernels --------------------------------------------------------------------------------


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    """``write_model(tensors, name="model.safetensors", metadata=None) -> path``."""

    def _write(
        tensors: dict[str, torch.Tensor],
        name: str = "model.safetensors",
        metadata: dict[str, str] | None = None,
    ) -> Path:
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    return _write


def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A small model with the usual tensor kinds: linears, biases, norms, an embedding."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    return {
        "embed_tokens.weight": randn(100, 64),
        "blocks.0.norm1.weight": torch.ones(64, dtype=dtype),
        "blocks.0.attn.qkv.weight": randn(192, 64),
        "blocks.0.attn.qkv.bias": randn(192),
        "blocks.0.attn.proj.weight": randn(64, 64),
        "blocks.0.mlp.fc1.weight": randn(256, 64),
        "blocks.0.mlp.fc2.weight": randn(64, 256),
        "blocks.0.mlp.fc2.bias": randn(64),
        "head.weight": randn(48, 64),
        "step": torch.tensor([7], dtype=torch.int64),
    }


@pytest.fixture
def tiny_state() -> Callable[..., dict[str, torch.Tensor]]:
    """The ``tiny_transformer`` factory, for tests that build variants of it."""
    return tiny_transformer


@pytest.fixture
def tiny_model(write_model: Callable[..., Path]) -> Path:
    return write_model(tiny_transformer(), metadata={"modelspec.title": "tiny", "note": "ünïcode"})


# --- tiny models with the real key names of each architecture (issue 3) ----------------------


@pytest.fixture(scope="session")
def tiny_archs() -> ModuleType:
    """``tests/tiny_archs.py`` (loaded by path: the tests folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "tiny_archs", Path(__file__).with_name("tiny_archs.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
