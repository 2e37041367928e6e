"""Triton kernels. Imports torch and triton only; Triton is found lazily and is optional."""
