"""Speed follow-up of issue 5 in ONE GPU call: activation quantizer, GEMM sweep, full paths.

    bash bench/gpu.sh bench/gemm_speed.py [--budget-s 170] [--no-flux]

1. Compiles every Triton variant of this run in parallel worker processes first (Triton's disk
   cache is shared), while the main process checks correctness: activation quantization bit for
   bit against ``matmul.quantize_activations`` for every launch shape, FP8 hardware cast
   included; each GEMM variant against the PyTorch reference and float64; cuBLAS FP8 with its
   bias epilogue; which row counts cuBLAS's block-scaled FP8 GEMM accepts.
2. Times, against baselines measured in the same run: activation quantization vs a
   device-to-device copy (``do_bench``, L2 flushed); GEMM-only variants at M=4096 and
   (K, N) in {(3072, 3072), (3072, 12288), (12288, 3072)} vs bf16 ``torch.matmul`` (back-to-back
   calls, 3 rotated input sets); the full paths (activation quantization + GEMM + bias, through
   ``dispatch.block_scaled_linear``) eager and as CUDA graphs; host time per call; every block
   linear shape of the Flux step per backend.
3. Runs ``bench/runtime_flux.py`` (issue 7's step) unless ``--no-flux``.

Sections past ``--budget-s`` are skipped (reported). Writes ``$OUT/gemm_speed.json``; prints
a table with the card's name last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from gpu_timing import (
    DEV,
    Record,
    bench_graph,
    bench_stream,
    randn,
    rel,
    same_bits,
    start_precompile,
    wait_precompile,
)
from gpu_timing import bench as _bench

from comfyui_quantizer.kernels import block_gemm
from comfyui_quantizer.kernels import quantize as kquant
from comfyui_quantizer.quant_core import dispatch, formats, matmul
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

B = 128
M = 4096
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N)
GC = block_gemm.GemmConfig
AC = kquant.ActConfig
INT8_CONFIGS: dict[str, block_gemm.GemmConfig | None] = {
    "default": None,
    "64x128w4s2g16": GC(64, 128, 4, 2, group_m=16),
    "64x128w4s4g8": GC(64, 128, 4, 4, group_m=8),
    "64x128w8s3g16": GC(64, 128, 8, 3, group_m=16),
    "64x64w4s5g16": GC(64, 64, 4, 5, group_m=16),
    "128x64w8s4g8": GC(128, 64, 8, 4, group_m=8),
    "128x128w8s2g8": GC(128, 128, 8, 2, group_m=8),
    "128x128w8s2g8-r128": GC(128, 128, 8, 2, group_m=8, maxnreg=128),
    "256x64w8s3g8": GC(256, 64, 8, 3, group_m=8),
    "64x128w4s3g16-per-tile": GC(64, 128, 4, 3, group_m=16),  # the default before kernels2
    "64x128w4s3g16-ptr": GC(64, 128, 4, 3, group_m=16, use_tma=False),
    "64x128w4s3-noscale": GC(64, 128, 4, 3, group_m=16, no_scale=True),
    "128x128w8s3-noscale": GC(128, 128, 8, 3, group_m=8, no_scale=True),
}
FP8_CONFIGS: dict[str, block_gemm.GemmConfig | None] = {
    "default": None,
    "128x64w8s4g8": GC(128, 64, 8, 4, group_m=8),
}
ACT_CONFIGS: dict[str, kquant.ActConfig | None] = {
    "default": None,
    "r32g1w4": AC(32, 1, 4),
    "r8g4w4": AC(8, 4, 4),
    "r32g2w8": AC(32, 2, 8),
}
# Every block linear of bench/runtime_flux.py: (M, N, K) -> count per step.
FLUX_LINEARS = {
    (1, 18432, 3072): 4,
    (1, 9216, 3072): 4,
    (4096, 9216, 3072): 2,
    (512, 9216, 3072): 2,
    (4096, 3072, 3072): 2,
    (512, 3072, 3072): 2,
    (4096, 12288, 3072): 2,
    (512, 12288, 3072): 2,
    (4096, 3072, 12288): 2,
    (512, 3072, 12288): 2,
    (4608, 21504, 3072): 4,
    (4608, 3072, 15360): 4,
}
SCALED_MM_ROWS = (1, 2, 8, 16, 24, 48, 64, 100, 512)
ACT_KS = (3072, 12288)  # activation widths timed (x [M, K])
ODD_K = 1000  # not a multiple of the block

REC = Record()
RESULTS = REC.data
log, check, timing, guarded = REC.log, REC.check, REC.timing, REC.guarded


def _do_bench(fn: Callable[..., object], sets: Sequence[tuple]) -> float:
    return _bench(fn, sets, warmup=10, rep=50)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], n: int = 200) -> float:
    """Host time per call (us) of ``fn`` on tiny inputs: the launch path, not the GPU."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


# ------------------------------------------------------------------------------ precompile


def _warm(job: tuple[str, str, str]) -> str:
    """Worker: compile one variant by launching it with this run's specializations (divisibility
    of sizes and strides, output dtype, bias) on this run's shapes; fills Triton's disk cache."""
    what, kind_name, name = job
    torch.manual_seed(0)
    fp8 = kind_name == "fp8"
    kind = Kind.FP8 if fp8 else Kind.INT8
    t0 = time.perf_counter()
    try:
        if what == "act":
            for k in ACT_KS:
                x = randn(M, k)
                kquant.quantize_activations(x, fp8=fp8, block_size=B, config=ACT_CONFIGS[name])
        elif what == "gemm":
            cfg = (FP8_CONFIGS if fp8 else INT8_CONFIGS)[name]
            for (k, n), out_dtype in (
                (SHAPES[0], torch.bfloat16),
                (SHAPES[0], torch.float32),
                (SHAPES[-1], torch.bfloat16),
            ):
                x = randn(M, k)
                fmt = Format(kind, Scaling.BLOCK, B)
                codes, scale = dispatch.quantize(randn(n, k, std=0.02), fmt)
                a_codes, a_scale = dispatch.quantize_activations(x, fmt)
                block_gemm.block_scaled_mm(
                    a_codes, a_scale, codes, scale, block_size=B, bias=None,
                    out_dtype=out_dtype, config=cfg,
                )  # fmt: skip
        else:  # the full path with bias, as the runtime calls it; M = 1 as in the modulation
            fmt = Format(kind, Scaling.BLOCK, B)
            for m, (k, n) in ((M, SHAPES[0]), (1, SHAPES[0])):
                codes, scale = dispatch.quantize(randn(n, k, std=0.02), fmt)
                for be in ("auto", "triton"):
                    dispatch.block_scaled_linear(
                        randn(m, k), codes, scale, fmt, randn(n), backend=be
                    )
        sync()
        return f"{job}: {time.perf_counter() - t0:.1f}s"
    except Exception as exc:
        return f"{job}: FAILED {type(exc).__name__}: {str(exc)[:300]}"


def precompile_jobs() -> list[tuple[str, str, str]]:
    jobs = [("full", k, "default") for k in ("int8", "fp8")]
    jobs += [("act", k, n) for k in ("int8", "fp8") for n in ACT_CONFIGS]
    jobs += [("gemm", "int8", n) for n in INT8_CONFIGS]
    jobs += [("gemm", "fp8", n) for n in FP8_CONFIGS]
    return jobs


# ------------------------------------------------------------------------------ checks


def check_activations() -> None:
    """Every launch shape bit for bit against the PyTorch spec (run on the GPU: IEEE ops)."""
    for kind in (Kind.INT8, Kind.FP8):
        fp8 = kind is Kind.FP8
        for k, dtype in (*((k, torch.bfloat16) for k in ACT_KS), (ODD_K, torch.float16)):
            x = randn(M, k, dtype=dtype)
            x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -3e-8], dtype=dtype)
            x[1, :128] = 0.0
            x[2, 128:256] *= 1e-30
            r_codes, r_scale = matmul.quantize_activations(x, kind, B)
            for name, cfg in ACT_CONFIGS.items():
                if k == ODD_K and name != "default":
                    continue
                codes, scale = kquant.quantize_activations(x, fp8=fp8, block_size=B, config=cfg)
                ok = same_bits(codes, r_codes) and same_bits(scale, r_scale)
                diff = int((codes.view(torch.uint8) != r_codes.view(torch.uint8)).sum())
                check(f"act {kind.value} [{M},{k}] {dtype} [{name}]", ok, codes_differing=diff)
            if fp8:  # the grid-rounding path (what the CPU tests run) on the GPU too
                cfg = AC(hw_fp8=False)
                codes, _ = kquant.quantize_activations(x, fp8=True, block_size=B, config=cfg)
                check(f"act fp8 [{M},{k}] {dtype} [grid rounding]", same_bits(codes, r_codes))


def _operands(k: int, n: int, kind: Kind):
    x = randn(M, k)
    w = randn(n, k, std=0.02)
    fmt = Format(kind, Scaling.BLOCK, B)
    codes, scale = dispatch.quantize(w, fmt)
    b = randn(n, std=0.1)
    return x, w, fmt, codes, scale, b


def check_gemms() -> None:
    """Each variant at M=4096, K=N=3072 (and the default at every shape) against the reference
    (fp32 out) and float64 (bf16 out); full dispatch paths with bias against float64."""
    for kind, configs in ((Kind.INT8, INT8_CONFIGS), (Kind.FP8, FP8_CONFIGS)):
        for k, n in SHAPES:
            x, w, fmt, codes, scale, bias = _operands(k, n, kind)
            a_codes, a_scale = dispatch.quantize_activations(x, fmt)
            ref = matmul.block_scaled_mm_reference(a_codes, a_scale, codes, scale, block_size=B)
            deq_a = a_codes.double() * a_scale.double().repeat_interleave(B, 1)[:, :k]
            deq_w = formats.dequantize(codes, scale, fmt, torch.float64)
            q64 = deq_a @ deq_w.T
            exact = x.double() @ w.double().T + bias.double()
            for name, cfg in configs.items():
                if (k, n) != SHAPES[0] and name != "default":
                    continue
                if cfg is not None and cfg.no_scale:
                    continue
                got32 = block_gemm.block_scaled_mm(
                    a_codes, a_scale, codes, scale, block_size=B, bias=None,
                    out_dtype=torch.float32, config=cfg,
                )  # fmt: skip
                got = block_gemm.block_scaled_mm(
                    a_codes, a_scale, codes, scale, block_size=B, bias=None,
                    out_dtype=torch.bfloat16, config=cfg,
                )  # fmt: skip
                e_ref, e_q64 = rel(got32, ref), rel(got, q64)
                arith = 1e-5 if kind is Kind.INT8 else 1e-2
                check(
                    f"gemm {kind.value} triton [{name}] K={k} N={n}",
                    e_ref < arith and e_q64 < 1e-2,
                    fp32_vs_reference=f"{e_ref:.2e}",
                    bf16_vs_f64_of_quantized=f"{e_q64:.2e}",
                )
            if kind is Kind.FP8 and DEV.type == "cuda":
                for epilogue in (False, True):
                    got = block_gemm.fp8_scaled_mm(
                        a_codes, a_scale, codes, scale, bias=bias, out_dtype=torch.bfloat16,
                        bias_epilogue=epilogue,
                    )  # fmt: skip
                    want = q64 + bias.double()
                    check(
                        f"gemm fp8 cuBLAS bias_epilogue={epilogue} K={k} N={n}",
                        rel(got, want) < 1e-2,
                        bf16_vs_f64_of_quantized=f"{rel(got, want):.2e}",
                    )
            y = dispatch.block_scaled_linear(x, codes, scale, fmt, bias)
            choice = dispatch.choose_block_linear(x, codes, fmt).backend
            # The bound is on the kernel's arithmetic (float64 of the same quantized operands,
            # as in KERNELS_NOTES.md); the error against the unquantized product is the
            # format's own (~1.1 % INT8, ~3.7 % FP8) and is reported, not bounded.
            bound = 1e-2 if kind is Kind.INT8 else 3e-2
            e_q = rel(y, q64 + bias.double())
            check(
                f"FULL {fmt.label} dispatch[{choice}] K={k} N={n} vs float64 (bound {bound})",
                e_q <= bound and bool(torch.isfinite(y).all()),
                err_vs_f64_of_quantized=f"{e_q:.2e}",
                err_vs_f64_unquantized=f"{rel(y, exact):.2e}",
            )


def check_scaled_mm_rows() -> None:
    """Which row counts cuBLAS's block-scaled FP8 GEMM accepts (M=1 failed before)."""
    if DEV.type != "cuda":
        return
    k, n = SHAPES[0]
    fmt = Format(Kind.FP8, Scaling.BLOCK, B)
    codes, scale = dispatch.quantize(randn(n, k, std=0.02), fmt)
    accepted, refused = [], []
    for rows in SCALED_MM_ROWS:
        x = randn(rows, k)
        a_codes, a_scale = dispatch.quantize_activations(x, fmt)
        try:
            got = block_gemm.fp8_scaled_mm(
                a_codes, a_scale, codes, scale, bias=None, out_dtype=torch.float32
            )
            ref = matmul.block_scaled_mm_reference(a_codes, a_scale, codes, scale, block_size=B)
            (accepted if rel(got, ref) < 2e-3 else refused).append(rows)
        except RuntimeError as exc:
            refused.append(rows)
            log(f"cuBLAS refused M={rows}: {str(exc).splitlines()[0][:150]}")
    check(
        f"cuBLAS block-scaled FP8 rows: dispatch min {dispatch.SCALED_MM_MIN_ROWS}",
        all(r < dispatch.SCALED_MM_MIN_ROWS for r in refused),
        accepted=accepted,
        refused=refused,
    )
    # The dispatcher must not pick cuBLAS for M = 1, and must still run it.
    x1 = randn(1, k)
    choice = dispatch.choose_block_linear(x1, codes, fmt).backend
    y = dispatch.block_scaled_linear(x1, codes, scale, fmt)
    check(f"dispatch M=1 fp8 -> {choice}", choice != "scaled_mm" and y.shape == (1, n))


# ------------------------------------------------------------------------------ timings


def time_activations() -> None:
    for k in ACT_KS:
        sets = [(randn(M, k), randn(M, k)) for _ in range(3)]
        copy_ms = _do_bench(lambda src, dst: dst.copy_(src), sets)
        copy_bw = 2 * M * k * 2 / copy_ms / 1e9
        timing(f"copy bf16 [{M},{k}]", copy_ms, tbps=round(copy_bw, 3))
        moved = M * k * 3 + M * (k // B) * 4
        for kind in (Kind.INT8, Kind.FP8):
            fp8 = kind is Kind.FP8
            for name, cfg in ACT_CONFIGS.items():
                ms = _do_bench(
                    lambda x, _, cfg=cfg, fp8=fp8: kquant.quantize_activations(
                        x, fp8=fp8, block_size=B, config=cfg
                    ),
                    sets,
                )
                bw = moved / ms / 1e9
                timing(
                    f"act {kind.value} [{M},{k}] [{name}]",
                    ms,
                    tbps=round(bw, 3),
                    of_copy=round(bw / copy_bw, 3),
                )


def time_gemms() -> None:
    for k, n in SHAPES:
        flop = 2 * M * n * k
        tag = f"K={k} N={n}"

        def tflops(ms: float, flop: int = flop) -> float:
            return round(flop / ms / 1e9, 1)

        sets = []
        for _ in range(3):
            x = randn(M, k)
            w = randn(n, k, std=0.02)
            bias = randn(n, std=0.1)
            q = {kind: dispatch.quantize(w, Format(kind, Scaling.BLOCK, B)) for kind in Kind}
            sets.append((x, w, bias, q))
        bf16 = bench_stream(lambda x, w, b, q: torch.matmul(x, w.T), sets)
        timing(f"bf16 matmul {tag}", bf16, tflops=tflops(bf16))
        bf16_lin = bench_stream(lambda x, w, b, q: torch.nn.functional.linear(x, w, b), sets)
        timing(f"bf16 F.linear+bias {tag}", bf16_lin, vs_bf16=round(bf16 / bf16_lin, 3))
        bf16_graph = bench_graph(lambda x, w, b, q: torch.nn.functional.linear(x, w, b), sets)
        timing(f"bf16 F.linear+bias (graph) {tag}", bf16_graph, tflops=tflops(bf16_graph))
        int8_fmt = Format(Kind.INT8, Scaling.BLOCK, B)
        deq = bench_stream(
            lambda x, w, b, q, fmt=int8_fmt: torch.nn.functional.linear(
                x, dispatch.dequantize(*q[Kind.INT8], fmt, torch.bfloat16), b
            ),
            sets,
        )
        timing(f"dequantize+bf16 linear {tag}", deq, vs_bf16=round(bf16 / deq, 3))
        for kind, configs in ((Kind.INT8, INT8_CONFIGS), (Kind.FP8, FP8_CONFIGS)):
            fmt = Format(kind, Scaling.BLOCK, B)
            qa = [(*dispatch.quantize_activations(s[0], fmt), *s[3][kind]) for s in sets]
            for name, cfg in configs.items():
                try:
                    ms = bench_stream(
                        lambda ac, asc, wc, ws, cfg=cfg: block_gemm.block_scaled_mm(
                            ac, asc, wc, ws, block_size=B, bias=None,
                            out_dtype=torch.bfloat16, config=cfg,
                        ),
                        qa,
                    )  # fmt: skip
                except Exception as exc:
                    RESULTS["errors"].append(
                        {"section": f"{kind} {name} {tag}", "error": repr(exc)}
                    )
                    log(f"!! {kind} {name}: {exc!r}"[:500])
                    continue
                timing(
                    f"gemm-only {kind.value} triton [{name}] {tag}",
                    ms,
                    tflops=tflops(ms),
                    vs_bf16=round(bf16 / ms, 3),
                )
            if kind is Kind.FP8 and DEV.type == "cuda":
                ms = bench_stream(
                    lambda ac, asc, wc, ws: block_gemm.fp8_scaled_mm(
                        ac, asc, wc, ws, bias=None, out_dtype=torch.bfloat16
                    ),
                    qa,
                )
                timing(
                    f"gemm-only fp8 cuBLAS {tag}",
                    ms,
                    tflops=tflops(ms),
                    vs_bf16=round(bf16 / ms, 3),
                )
        # Full paths, bias included, as the runtime calls them.
        for kind in Kind:
            fmt = Format(kind, Scaling.BLOCK, B)
            backends = ["auto", "triton"] if kind is Kind.FP8 else ["auto"]
            for be in backends:

                def full(x, w, b, q, fmt=fmt, kind=kind, be=be):
                    return dispatch.block_scaled_linear(x, *q[kind], fmt, b, backend=be)

                choice = dispatch.choose_block_linear(sets[0][0], sets[0][3][kind][0], fmt, be)
                label = f"FULL {fmt.label} [{choice.backend}] {tag}"
                ms = bench_stream(full, sets)
                timing(
                    label + " eager",
                    ms,
                    tflops=tflops(ms),
                    vs_bf16=round(bf16 / ms, 3),
                    vs_bf16_linear=round(bf16_lin / ms, 3),
                    vs_dequant=round(deq / ms, 3),
                )
                ms = bench_graph(full, sets)
                timing(
                    label + " graph",
                    ms,
                    tflops=tflops(ms),
                    vs_bf16_linear_graph=round(bf16_graph / ms, 3),
                    vs_dequant=round(deq / ms, 3),
                )


def _host_rows(kind: Kind, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict:
    fmt = Format(kind, Scaling.BLOCK, B)
    codes, scale = dispatch.quantize(w, fmt)
    fp8 = kind is Kind.FP8
    ac, asc = kquant.quantize_activations(x, fp8=fp8, block_size=B)
    ptr_cfg = GC(64, 128, 4, 3, group_m=16, use_tma=False)
    rows = {
        "quantize_activations": lambda: kquant.quantize_activations(x, fp8=fp8, block_size=B),
        "block_scaled_mm (TMA)": lambda: block_gemm.block_scaled_mm(
            ac, asc, codes, scale, block_size=B, bias=b, out_dtype=torch.bfloat16
        ),
        "block_scaled_mm (pointers)": lambda: block_gemm.block_scaled_mm(
            ac, asc, codes, scale, block_size=B, bias=b, out_dtype=torch.bfloat16, config=ptr_cfg
        ),
        "dispatch.choose_block_linear": lambda: dispatch.choose_block_linear(x, codes, fmt),
        "dispatch.block_scaled_linear": lambda: dispatch.block_scaled_linear(
            x, codes, scale, fmt, b
        ),
    }
    if fp8:
        rows["fp8_scaled_mm"] = lambda: block_gemm.fp8_scaled_mm(
            ac, asc, codes, scale, bias=b, out_dtype=torch.bfloat16, bias_epilogue=True
        )
    return rows


def time_host() -> None:
    """Host time per call on small shapes (M=64, K=N=512): the launch path."""
    x = randn(64, 512)
    w = randn(512, 512, std=0.02)
    b = randn(512, std=0.1)
    for kind in Kind:
        for name, fn in _host_rows(kind, x, w, b).items():
            try:
                us = host_us(fn)
            except Exception as exc:
                log(f"!! host {name}: {exc!r}"[:300])
                continue
            timing(f"host {kind.value} {name}", us / 1e3, host_us=round(us, 1))
    us = host_us(lambda: torch.nn.functional.linear(x, w, b))
    timing("host bf16 F.linear", us / 1e3, host_us=round(us, 1))


def time_flux_linears() -> None:
    """Each Flux block linear alone, bias included: bf16 vs each backend (back-to-back calls)."""
    totals: dict[str, float] = {}
    for (m, n, k), count in FLUX_LINEARS.items():
        sets = []
        for _ in range(2):
            x = randn(m, k)
            w = randn(n, k, std=0.02)
            b = randn(n, std=0.1)
            q = {kind: dispatch.quantize(w, Format(kind, Scaling.BLOCK, B)) for kind in Kind}
            sets.append((x, w, b, q))
        row: dict[str, float] = {}
        row["bf16"] = bench_stream(lambda x, w, b, q: torch.nn.functional.linear(x, w, b), sets)
        for kind in Kind:
            fmt = Format(kind, Scaling.BLOCK, B)
            backends = ["auto", "triton", "scaled_mm"] if kind is Kind.FP8 else ["auto"]
            for be in backends:
                label = f"{kind.value}-{be}"
                try:
                    row[label] = bench_stream(
                        lambda x, w, b, q, fmt=fmt, kind=kind, be=be: dispatch.block_scaled_linear(
                            x, *q[kind], fmt, b, backend=be
                        ),
                        sets,
                    )
                except Exception as exc:
                    log(f"!! flux {label} {m}x{n}x{k}: {str(exc).splitlines()[0][:150]}")
        for label, ms in row.items():
            totals[label] = totals.get(label, 0.0) + count * ms
        timing(
            f"flux linear {m}x{n}x{k} x{count}",
            row["bf16"],
            **{lbl: round(ms * 1e3, 1) for lbl, ms in row.items()},
        )
    timing(
        "flux block linears, sum per step (us)",
        totals["bf16"],
        **{lbl: round(ms * 1e3, 1) for lbl, ms in totals.items()},
        **{f"speedup_{lbl}": round(totals["bf16"] / ms, 3) for lbl, ms in totals.items()},
    )


def run_flux(budget_left: float) -> None:
    script = Path(__file__).with_name("runtime_flux.py")
    out = Path(os.environ.get("OUT", "/tmp")) / "runtime_flux.json"
    cmd = [sys.executable, str(script), "--repeats", "6", "--out", str(out)]
    log(f"running {' '.join(cmd[1:])}")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=max(30, budget_left), check=False
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    RESULTS["flux_stdout"] = [{"rc": proc.returncode, "tail": tail}]
    print(tail, flush=True)


# ------------------------------------------------------------------------------ main


def env() -> None:
    REC.env(
        scaled_mm_blockwise=dispatch._scaled_mm_problem(DEV) or "supported",
        scaled_mm_bias_epilogue=dispatch.scaled_mm_bias_epilogue(DEV),
    )


def summary() -> None:
    card = REC.card()
    fails = [c for c in RESULTS["checks"] if not c["ok"]]
    print(f"\n=== gemm_speed on {card} ({time.perf_counter() - REC.t0:.0f}s) ===")
    print(f"checks: {len(RESULTS['checks']) - len(fails)}/{len(RESULTS['checks'])} ok")
    for c in fails:
        print(f"  FAIL {c}")
    for c in RESULTS["checks"]:
        if c["name"].startswith(("FULL", "cuBLAS")):
            print(f"  {c}")
    for t in RESULTS["timings"]:
        extra = " ".join(f"{k}={v}" for k, v in t.items() if k not in ("name", "ms"))
        print(f"{t['name'][:64]:64s} {t['ms'] * 1e3:8.1f}  {extra}")
    for e in RESULTS["errors"]:
        print(f"ERROR {e['section']}: {e['error'][:300]}")
    for s in RESULTS["skipped"]:
        print(f"SKIPPED {s['section']}")


def cpu_smoke() -> None:
    """Every section on tiny shapes in Triton's interpreter (TRITON_INTERPRET=1 set before
    the run), timers replaced by one call per input set: the code paths, not the numbers."""
    global M, SHAPES, ACT_KS, ODD_K, FLUX_LINEARS, SCALED_MM_ROWS
    global _do_bench, bench_stream, bench_graph, host_us
    M, SHAPES, ACT_KS, ODD_K = 32, [(256, 256), (512, 128)], (256, 512), 200
    FLUX_LINEARS, SCALED_MM_ROWS = {(1, 256, 256): 1, (32, 128, 512): 2}, (1, 64)

    def once(fn, sets=((),), n: int = 0) -> float:
        for st in sets:
            fn(*st)
        return 1.0

    _do_bench = bench_stream = bench_graph = once
    host_us = once
    for job in (("full", "fp8", "default"), ("act", "int8", "r8g4w4"), ("gemm", "int8", "default")):
        log(f"warm {_warm(job)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=110.0)
    ap.add_argument("--workers", type=int, default=min(14, (os.cpu_count() or 2) - 2))
    ap.add_argument("--no-flux", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="code paths only (see cpu_smoke)")
    args = ap.parse_args()
    torch.manual_seed(0)
    budget = args.budget_s
    if args.cpu_smoke:
        cpu_smoke()
        args.workers, args.no_flux = 0, True
    futures = start_precompile(_warm, precompile_jobs(), args.workers) if args.workers > 0 else []
    if DEV.type == "cuda":
        guarded("env", env, budget)
    guarded("check activations", check_activations, budget)
    guarded("check cuBLAS rows", check_scaled_mm_rows, budget)
    wait_precompile(futures)
    guarded("check gemms", check_gemms, budget)
    guarded("time activations", time_activations, budget)
    guarded("time gemms", time_gemms, budget)
    guarded("time host", time_host, budget)
    guarded("time flux linears", time_flux_linears, budget)
    out = Path(os.environ.get("OUT", "/tmp")) / "gemm_speed.json"
    out.write_text(json.dumps(RESULTS, indent=1))
    if not args.no_flux:
        left = budget + 50 - (time.perf_counter() - REC.t0)
        guarded("runtime_flux", lambda: run_flux(left), budget)
    out.write_text(json.dumps(RESULTS, indent=1))
    summary()
    return 0 if REC.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
