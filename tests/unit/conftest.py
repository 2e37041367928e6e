"""Fixtures for unit tests."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# --- kernels (issue 5): Triton kernels on CPU through Triton's interpreter ---------------------
# TRITON_INTERPRET=1 is set in tests/conftest.py, before anything imports triton (triton's own
# tl.* helpers are jit functions, defined at import), and only where there is no CUDA device.
_KERNEL_MODULES = ("quantize", "dequantize", "block_gemm")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where kernel tests run: CUDA when present, else CPU through Triton's interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") != "1" or isinstance(tl.max, JITFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)")
    for name in _KERNEL_MODULES:  # a kernel module compiled for the GPU is imported again
        module = sys.modules.get(f"comfyui_quantizer.kernels.{name}")
        if module is not None and any(isinstance(v, JITFunction) for v in vars(module).values()):
            importlib.reload(module)
    return torch.device("cpu")


# --- end kernels ------------------------------------------------------------------------------
