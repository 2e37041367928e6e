"""The one place quant_core reaches the kernels: pick a backend per call, same results.

Backends, in the order an automatic choice tries them:

- ``scaled_mm`` (FP8 block GEMM only): cuBLAS's 1x128 x 128x128 block-scaled FP8 GEMM through
  ``torch._scaled_mm`` (activations quantized by Triton when available);
- ``triton``: the kernels in ``kernels/`` (CUDA, or Triton's CPU interpreter when
  ``TRITON_INTERPRET=1``);
- ``torch``: the PyTorch reference in ``formats`` / ``matmul`` — always available.

Every function takes ``backend="auto"``: the first backend that can run the call is used; when
a preferred one cannot, the reason is logged once (INFO on CUDA, DEBUG on CPU, where PyTorch
is the normal path). Naming a backend that cannot run the call raises
:class:`BackendUnavailableError` listing every backend's reason. Triton is imported only when a
call could use it, and no kernel is compiled before its first launch.

Quantize/dequantize results are bit-identical across backends; ``block_scaled_linear`` agrees
within the float32 rounding of its sums (the kernels add in a different order).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass, field

import torch

from . import formats, matmul
from .errors import ConfigError
from .formats import Format, Kind, Scaling

log = logging.getLogger(__name__)

AUTO = "auto"
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Block sizes the Triton kernels handle: a power of two (tile shapes) in this range.
TRITON_BLOCK_SIZES = (32, 64, 128)


class BackendUnavailableError(ConfigError):
    """A backend was named explicitly but cannot run this call; the message says why."""


@dataclass(frozen=True)
class Choice:
    """The backend a call runs on, and why each other backend was not used."""

    backend: str
    reasons: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- availability


@functools.cache
def _import_problem(module: str) -> str | None:
    """Why an optional ``module`` (triton, numba) cannot be used (None when it imports)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not importable ({exc})"
    except Exception as exc:  # a broken install must not break the pack
        return f"import {module} failed: {type(exc).__name__}: {exc}"
    return None


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_device_problem(device: torch.device, *, fp8: bool) -> str | None:
    problem = _import_problem("triton")
    if problem:
        return problem
    if device.type == "cuda":
        if fp8 and _capability(device) < (8, 9):
            return "FP8 kernels need compute capability 8.9 or newer"
        return None
    if device.type == "cpu" and _interpreter_on():
        return None
    return f"tensor on {device.type} (Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"


@functools.cache
def _kernels(name: str):
    """Import ``kernels.<name>`` lazily (this defines its Triton kernels)."""
    return importlib.import_module(f"..kernels.{name}", __package__)


def _block_problem(fmt: Format) -> str | None:
    if fmt.scaling is Scaling.BLOCK and fmt.block_size not in TRITON_BLOCK_SIZES:
        return f"block size {fmt.block_size} not in {TRITON_BLOCK_SIZES}"
    return None


# ----------------------------------------------------------------------------- selection


@functools.cache
def _log_once(message: str, level: int) -> None:
    log.log(level, message)


def _choose(
    what: str, device: torch.device, candidates: dict[str, str | None], backend: str
) -> Choice:
    """First usable candidate (auto) or the named one; ``candidates``: name -> problem."""
    reasons = {name: why for name, why in candidates.items() if why is not None}
    if backend == AUTO:
        for name, why in candidates.items():
            if why is None:
                if reasons:
                    level = logging.INFO if device.type == "cuda" else logging.DEBUG
                    skipped = "; ".join(f"{k}: {v}" for k, v in reasons.items())
                    _log_once(f"{what}: using {name} ({skipped})", level)
                return Choice(name, reasons)
        raise AssertionError("the torch backend is always available")  # pragma: no cover
    if backend not in candidates:
        raise BackendUnavailableError(
            f"{what}: unknown backend {backend!r}; choose one of {[AUTO, *candidates]}"
        )
    if backend in reasons:
        detail = "; ".join(f"{k}: {v or 'available'}" for k, v in candidates.items())
        raise BackendUnavailableError(
            f"{what}: backend {backend!r} cannot run this call ({detail})"
        )
    return Choice(backend, reasons)


# Set when the numba kernels failed at run time (a broken LLVM, an unwritable cache...): the
# conversion goes on with the PyTorch path, which gives the same codes.
_numba_failure: str | None = None


def cpu_kernel_problem() -> str | None:
    """Why the numba CPU kernels are not used (None when they are)."""
    return _import_problem("numba") or _numba_failure


def choose_cpu_kernel(w: torch.Tensor, backend: str = AUTO) -> Choice:
    """Backend for the CPU conversion's per-chunk math: ``numba`` (one fused pass) or ``torch``."""
    problem = cpu_kernel_problem()
    if problem is None and w.device.type != "cpu":
        problem = f"tensor on {w.device.type} (the numba kernel runs on the CPU)"
    return _choose("cpu quantize", w.device, {"numba": problem, "torch": None}, backend)


def quantize_and_measure(
    w: torch.Tensor,
    fmt: Format,
    *,
    workers: int = 1,
    backend: str = AUTO,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, formats.ErrorEnergy, str]:
    """Round-to-nearest codes, scale and error energy of ``w`` — the conversion's hot path.

    On CUDA: the quantize kernel, then the error measured on the device. On the CPU: the chunked
    loop of ``formats.quantize_and_measure``, with its per-chunk math in one fused numba pass
    when numba is installed (same codes), into ``out`` if given (CPU only). Returns the backend
    used as the last element.
    """
    if w.is_cuda:
        if choose_quantize(w, fmt, backend).backend == "torch":
            return (*formats.quantize_and_measure(w, fmt), "torch")  # one pass on the device
        codes, scale = quantize(w, fmt, backend="triton")
        return codes, scale, formats.error_energy(w, codes, scale, fmt), "triton"
    choice = choose_cpu_kernel(w, backend)
    if choice.backend == "numba":
        try:
            codes, scale, energy = formats.quantize_and_measure(
                w, fmt, workers=workers, chunk_kernel=_NumbaChunks(fmt.kind is Kind.FP8), out=out
            )
            return codes, scale, energy, "numba"
        except formats.NonFiniteWeightError:
            raise
        except Exception as exc:
            if backend != AUTO:
                raise
            global _numba_failure
            _numba_failure = f"the numba kernel failed ({type(exc).__name__}: {exc})"
            log.warning("cpu quantize: %s; continuing with the PyTorch path", _numba_failure)
    codes, scale, energy = formats.quantize_and_measure(w, fmt, workers=workers, out=out)
    return codes, scale, energy, "torch"


class _NumbaChunks:
    """``formats.ChunkKernel`` on the numba kernels of ``kernels/cpu_quantize.py``."""

    def __init__(self, fp8: bool) -> None:
        self._k = _kernels("cpu_quantize")
        self._fp8 = fp8
        self.dtypes: frozenset[torch.dtype] = self._k.STORED_DTYPES

    def absmax(self, x: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
        return self._k.absmax_chunk(x, block_rows, block_cols)

    def quantize(
        self, x: torch.Tensor, grid: torch.Tensor, block_rows: int, block_cols: int,
        codes: torch.Tensor,
    ) -> tuple[float, float]:  # fmt: skip
        return self._k.quantize_chunk(x, grid, block_rows, block_cols, codes, fp8=self._fp8)


def choose_quantize(w: torch.Tensor, fmt: Format, backend: str = AUTO) -> Choice:
    """Backend for ``quantize(w, fmt)``."""
    problem = _triton_device_problem(w.device, fp8=fmt.kind is Kind.FP8)
    if problem is None and w.dtype not in INPUT_DTYPES:
        problem = f"input dtype {w.dtype} (kernels take bf16, fp16, fp32)"
    if problem is None and w.dim() != 2:
        problem = f"input is {w.dim()}-D, kernels take 2-D"
    problem = problem or _block_problem(fmt)
    what = f"quantize {fmt.label} on {w.device}"
    return _choose(what, w.device, {"triton": problem, "torch": None}, backend)


def choose_dequantize(
    codes: torch.Tensor, fmt: Format, dtype: torch.dtype, backend: str = AUTO
) -> Choice:
    """Backend for ``dequantize(codes, scale, fmt, dtype)``."""
    problem = _triton_device_problem(codes.device, fp8=fmt.kind is Kind.FP8)
    if problem is None and dtype not in INPUT_DTYPES:
        problem = f"output dtype {dtype} (kernels write bf16, fp16, fp32)"
    if problem is None and codes.dim() != 2:
        problem = f"codes are {codes.dim()}-D, kernels take 2-D"
    problem = problem or _block_problem(fmt)
    what = f"dequantize {fmt.label} on {codes.device}"
    return _choose(what, codes.device, {"triton": problem, "torch": None}, backend)


@functools.cache
def _scaled_mm_problem(device: torch.device) -> str | None:
    """Whether ``torch._scaled_mm`` does 1x128 x 128x128 block-scaled FP8 here, and matches
    the reference on a small problem (probed once per device)."""
    if device.type != "cuda":
        return "needs CUDA"
    if _capability(device) != (9, 0):
        return "cuBLAS block-scaled FP8 needs compute capability 9.0"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    try:
        err = _scaled_mm_probe(device, with_bias=False)
    except Exception as exc:  # the installed torch/cuBLAS cannot do it: record why
        return f"torch {torch.__version__}: {type(exc).__name__}: {str(exc)[:200]}"
    # Layout mistakes give O(1) errors; cuBLAS's own summation order gives ~1e-4.
    if not err < 2e-3:
        return f"torch {torch.__version__}: probe differs from the reference (rel. error {err:.1e})"
    return None


@functools.cache
def scaled_mm_bias_epilogue(device: torch.device) -> bool:
    """Whether cuBLAS adds a bf16 bias in the block-scaled GEMM's epilogue here (one rounding,
    no extra pass over the output), checked against the reference once per device."""
    if _scaled_mm_problem(device) is not None:
        return False
    try:
        err = _scaled_mm_probe(device, with_bias=True)
    except Exception as exc:
        _log_once(f"cuBLAS block-scaled FP8: no bias epilogue ({type(exc).__name__})", logging.INFO)
        return False
    return err < 1e-2  # bf16 output: one rounding, ~2e-3


def _scaled_mm_probe(device: torch.device, *, with_bias: bool) -> float:
    """Relative error of cuBLAS's block-scaled FP8 GEMM against the reference, 256x512x256."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 512, device=device, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(256, 512, device=device, generator=gen, dtype=torch.bfloat16)
    bias = (
        torch.randn(256, device=device, generator=gen, dtype=torch.bfloat16) if with_bias else None
    )
    fmt = Format(Kind.FP8, Scaling.BLOCK, 128)
    codes, scale = formats.quantize(w, fmt)
    a_codes, a_scale = matmul.quantize_activations(x, Kind.FP8, 128)
    a_scale = a_scale.t().contiguous().t()
    out_dtype = torch.bfloat16 if with_bias else torch.float32
    got = _kernels("block_gemm").fp8_scaled_mm(
        a_codes, a_scale, codes, scale, bias=bias, out_dtype=out_dtype, bias_epilogue=with_bias
    )
    want = matmul.block_scaled_mm_reference(
        a_codes, a_scale, codes, scale, block_size=128, bias=bias
    )
    return float((got.float() - want).norm() / want.norm())


# cuBLAS's block-scaled FP8 GEMM refuses some shapes at run time (M = 1 raised
# CUBLAS_STATUS_NOT_SUPPORTED on an H200 with torch 2.11); for few rows the Triton kernel is
# the better choice anyway (bench/KERNELS_NOTES.md), so cuBLAS takes only M >= this.
SCALED_MM_MIN_ROWS = 64


def scaled_mm_shape_problem(rows: int, n: int, k: int, block_size: int | None) -> str | None:
    """Why cuBLAS's block-scaled FP8 GEMM is not used for ``[rows, k] @ [n, k].T`` (None: it is)."""
    if block_size != 128 or k % 512 or n % 128:
        return "needs B=128, K a multiple of 512 and N of 128"
    if rows < SCALED_MM_MIN_ROWS:
        return f"{rows} rows (cuBLAS takes M >= {SCALED_MM_MIN_ROWS}; it refuses M=1)"
    return None


def choose_block_linear(
    x: torch.Tensor, codes: torch.Tensor, fmt: Format, backend: str = AUTO
) -> Choice:
    """Backend for ``block_scaled_linear(x, codes, scale, fmt, ...)``; ``x`` ``[..., K]``."""
    fp8 = fmt.kind is Kind.FP8
    triton_problem = _triton_device_problem(x.device, fp8=fp8) or _block_problem(fmt)
    candidates: dict[str, str | None] = {}
    if fp8:
        n, k = codes.shape
        rows = x.numel() // max(1, x.shape[-1])
        if x.device.type != "cuda":
            candidates["scaled_mm"] = "needs CUDA"
        else:
            candidates["scaled_mm"] = scaled_mm_shape_problem(
                rows, n, k, fmt.block_size
            ) or _scaled_mm_problem(x.device)
    candidates["triton"] = triton_problem
    candidates["torch"] = None
    what = f"block_scaled_linear {fmt.label} on {x.device}"
    return _choose(what, x.device, candidates, backend)


# ----------------------------------------------------------------------------- operations


def quantize(
    w: torch.Tensor, fmt: Format, *, backend: str = AUTO
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as ``formats.quantize``: ``[out, in]`` -> codes ``[out, in]``, scale F32.

    Raises ``formats.NonFiniteWeightError`` when ``w`` holds NaN or Inf, whatever the backend.
    """
    choice = choose_quantize(w, fmt, backend)
    if choice.backend == "torch":
        return formats.quantize(w, fmt)
    codes, scale = _kernels("quantize").quantize(w, fmt)
    if not bool(torch.isfinite(scale).all()):
        raise formats.NonFiniteWeightError("weight contains NaN or Inf")
    return codes, scale


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format,
    dtype: torch.dtype = torch.float32,
    *,
    backend: str = AUTO,
) -> torch.Tensor:
    """Same as ``formats.dequantize``: codes and scale -> ``[out, in]`` in ``dtype``."""
    choice = choose_dequantize(codes, fmt, dtype, backend)
    if choice.backend == "torch":
        return formats.dequantize(codes, scale, fmt, dtype)
    return _kernels("dequantize").dequantize(codes, scale, fmt, dtype)


def quantize_activations(
    x: torch.Tensor, fmt: Format, *, backend: str = AUTO
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as ``matmul.quantize_activations``: ``[M, K]`` -> codes, scale ``[M, ceil(K/B)]``."""
    if fmt.block_size is None:
        raise ValueError(f"activation groups need a block format, got {fmt.label}")
    choice = choose_quantize(x, fmt, backend)
    if choice.backend == "torch":
        return matmul.quantize_activations(x, fmt.kind, fmt.block_size)
    return _kernels("quantize").quantize_activations(
        x, fp8=fmt.kind is Kind.FP8, block_size=fmt.block_size
    )


def block_scaled_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str = AUTO,
) -> torch.Tensor:
    """``x`` ``[..., K]`` @ block-quantized W ``[N, K]`` (+ bias) -> ``[..., N]``.

    Semantics of ``matmul.block_scaled_linear_reference``: activations quantized per ``1 x B``
    along K, exact 8-bit products per K-block, scaled by ``a_scale * w_scale`` in fp32.
    ``scale``: F32 ``[ceil(N/B), ceil(K/B)]``; ``out_dtype`` defaults to ``x.dtype``.
    """
    matmul.check_block_linear_args(x, codes, scale, fmt)
    assert fmt.block_size is not None
    out_dtype = out_dtype or x.dtype
    choice = choose_block_linear(x, codes, fmt, backend)
    if choice.backend == "torch":
        return matmul.block_scaled_linear_reference(x, codes, scale, fmt, bias, out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    triton_ok = choice.reasons.get("triton") is None
    if triton_ok:
        a_codes, a_scale = _kernels("quantize").quantize_activations(
            x2, fp8=fmt.kind is Kind.FP8, block_size=fmt.block_size
        )
    else:  # cuBLAS FP8 without Triton: activations quantized by the PyTorch reference
        a_codes, a_scale = matmul.quantize_activations(x2, fmt.kind, fmt.block_size)
    gemm = _kernels("block_gemm")
    y = None
    if choice.backend == "scaled_mm":
        epilogue = bias is not None and scaled_mm_bias_epilogue(x.device)
        try:
            y = gemm.fp8_scaled_mm(
                a_codes, a_scale, codes, scale, bias=bias, out_dtype=out_dtype,
                bias_epilogue=epilogue,
            )  # fmt: skip
        except RuntimeError as exc:  # a shape cuBLAS refuses: Triton runs it (logged once)
            if backend != AUTO or not triton_ok:
                raise
            _log_once(
                f"block_scaled_linear: cuBLAS refused {tuple(x2.shape)} @ {tuple(codes.shape)}"
                f" ({str(exc).splitlines()[0][:200]}); Triton runs it",
                logging.WARNING,
            )
    if y is None:
        y = gemm.block_scaled_mm(
            a_codes, a_scale, codes, scale, block_size=fmt.block_size, bias=bias,
            out_dtype=out_dtype,
        )  # fmt: skip
    return y.reshape(*lead, codes.shape[0])


# --- learned rounding (issue 4): the sequential part of GPTQ-style error feedback -------------


def choose_error_feedback(device: torch.device, backend: str = AUTO) -> Choice:
    """Backend for one column block of error feedback (``kernels/gptq.py`` or PyTorch).

    The kernel rounds on the FP8 grid with float32 arithmetic, so it needs no FP8 hardware.
    """
    problem = _triton_device_problem(device, fp8=False)
    return _choose(f"error feedback on {device}", device, {"triton": problem, "torch": None},
                   backend)  # fmt: skip


def error_feedback_block(
    target: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    ubar: torch.Tensor,
    kind: Kind,
    codes: torch.Tensor,
    pre: torch.Tensor,
) -> torch.Tensor:
    """The Triton kernel for one block (same contract as ``error_feedback._block_reference``);
    call it only where :func:`choose_error_feedback` chose ``triton``."""
    return _kernels("gptq").gptq_block(target, w, scale, ubar, kind.value, codes, pre)


# --- end learned rounding ---------------------------------------------------------------------
