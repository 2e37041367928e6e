"""Fixtures for unit tests."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

# --- kernels (issue 5): Triton kernels on CPU through Triton's interpreter ---------------------
_KERNEL_MODULES = ("quantize", "dequantize", "block_gemm")


@pytest.fixture
def kernel_device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Where kernel tests run: CUDA when present, else CPU through Triton's interpreter.

    ``TRITON_INTERPRET=1`` is set only for the duration of each kernel test (other tests never
    see it) and *before* the kernel modules are imported, since ``triton.jit`` picks the
    interpreter when a kernel is defined; a module compiled for the GPU is imported again.
    """
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from triton.runtime.jit import JITFunction

    for name in _KERNEL_MODULES:
        module = sys.modules.get(f"comfyui_quantizer.kernels.{name}")
        if module is not None and any(isinstance(v, JITFunction) for v in vars(module).values()):
            importlib.reload(module)
    return torch.device("cpu")


# --- end kernels ------------------------------------------------------------------------------
