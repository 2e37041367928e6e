"""Triton kernels. Imports torch and triton only; reached through ``quant_core.dispatch``.

- ``quantize``: fused quantize (FP8/INT8; tensor, row, ``B x B`` block) and ``1 x B``
  activation quantization, bit-identical to ``quant_core.formats`` / ``quant_core.matmul``.
- ``dequantize``: codes * scale to bf16/fp16/fp32, bit-identical to ``formats.dequantize``.
- ``block_gemm``: block-scaled INT8/FP8 linear (Triton) and cuBLAS's block-scaled FP8 GEMM.

Importing this package imports nothing (Triton is optional); importing a module defines its
kernels, and each kernel compiles on its first launch.
"""
