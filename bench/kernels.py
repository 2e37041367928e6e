"""Kernels on a GPU, in one call: correctness at DiT sizes, then timings (issue 5).

    bash bench/gpu.sh bench/kernels.py [--quick]

1. Every kernel against its PyTorch reference on random (never zero) inputs: quantize and
   dequantize bit for bit, activation quantization bit for bit, the block-scaled GEMMs against
   the reference and against float64.
2. Timings with CUDA events (``triton.testing.do_bench``: median, warm-up, L2 flushed) and
   inputs rotated among several sets larger than L2. Ratios are against baselines measured in
   the same run: a device-to-device copy (quantize), ``torch.matmul`` in bf16 and a
   dequantize-then-bf16-matmul path (GEMMs).

Writes ``$OUT/kernels.json`` and prints a table with the card's name last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from gpu_timing import (
    DEV,
    Record,
    bench,
    bench_graph,
    bench_stream,
    randn,
    rel,
    same_bits,
    start_precompile,
    wait_precompile,
)

from comfyui_quantizer.kernels import block_gemm
from comfyui_quantizer.kernels import quantize as kquant
from comfyui_quantizer.quant_core import dispatch, formats, matmul
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling

B = 128
FORMATS = [
    Format(Kind.FP8, Scaling.TENSOR),
    Format(Kind.FP8, Scaling.ROW),
    Format(Kind.FP8, Scaling.BLOCK, B),
    Format(Kind.INT8, Scaling.TENSOR),
    Format(Kind.INT8, Scaling.ROW),
    Format(Kind.INT8, Scaling.BLOCK, B),
]
WEIGHT_SHAPES = [(3072, 12288), (12288, 3072)]
GEMM_SHAPES = [(4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072)]  # (M, K, N)
ODD_SHAPE = (1000, 1500)  # not multiples of the block
ODD_GEMM = (1000, 1000, 600)  # (M, K, N): K and N not multiples of 128
ACT_ROWS, ACT_KS = 4096, (3072, 12288, 1000)
GC = block_gemm.GemmConfig
INT8_CONFIGS = {
    "default": None,
    "t64x128w4s4g16": GC(64, 128, 4, 4, group_m=16),
    "t64x128w4s3g8": GC(64, 128, 4, 3, group_m=8),
    "t128x128w8s3-noscale-ceiling": GC(128, 128, 8, 3, no_scale=True),
}
FP8_CONFIGS = {
    "default": None,
}
WC = kquant.WeightConfig
QUANT_LAUNCH: dict[str, dict[str, kquant.WeightConfig]] = {  # scaling -> {name: config}
    # Swept on an H200 (bench/KERNELS_NOTES.md, run 6); the rest of that sweep was slower.
    "row": {
        "default": WC(),
        "sweep-w4": WC(row_tile=0, num_warps=4),
        "sweep-w8": WC(row_tile=0, num_warps=8),
        "whole-w16": WC(row_tile=1, num_warps=16),
        "whole2-w8": WC(row_tile=2, num_warps=8),
    },
    "block": {
        "default": WC(),
        "g1w8": WC(num_warps=8),
        "g2w16": WC(groups=2, num_warps=16),
    },
    "tensor": {
        "default": WC(),
        "c16384w16": WC(chunk=16384, num_warps=16),
    },
}
GRID_FP8 = WC(hw_fp8=False)  # FP8 rounded on the grid in integer arithmetic (the CPU tests' path)
ACT_LAUNCH = {  # name -> kernels.quantize.ActConfig (None: the default launch shape)
    "default": None,
    "r32g1w4": kquant.ActConfig(32, 1, 4),
    "r8g4w4": kquant.ActConfig(8, 4, 4),
}

REC = Record()
RESULTS = REC.data
log, check, timing, guarded = REC.log, REC.check, REC.timing, REC.guarded


def _quantize_configs(fmt: Format) -> dict[str, kquant.WeightConfig]:
    configs = dict(QUANT_LAUNCH[fmt.scaling.value])
    if fmt.kind is Kind.FP8:
        configs["grid-fp8"] = GRID_FP8
    return configs


def _warm_quantize(job: tuple[int, str]) -> str:
    """Worker: compile one weight-quantize launch shape for this run's shapes."""
    index, name = job
    fmt = FORMATS[index]
    t0 = time.perf_counter()
    try:
        for shape in [WEIGHT_SHAPES[0], ODD_SHAPE]:
            kquant.quantize(randn(*shape, std=0.02), fmt, config=_quantize_configs(fmt)[name])
        torch.cuda.synchronize()
        return f"{fmt.label} {name}: {time.perf_counter() - t0:.1f}s"
    except Exception as exc:
        return f"{fmt.label} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}"


def check_quantize() -> None:
    """Bit-exact against the CPU reference (the spec: IEEE division); also counts how many
    scales torch's own CUDA run of ``formats.quantize`` gets differently (see notes)."""
    for fmt in FORMATS:
        for shape, dtype in [
            *((s, torch.bfloat16) for s in WEIGHT_SHAPES),
            (ODD_SHAPE, torch.float16),
            (ODD_SHAPE, torch.float32),
        ]:
            w = randn(*shape, dtype=dtype, std=0.02)
            codes, scale = dispatch.quantize(w, fmt, backend="triton")
            deq = dispatch.dequantize(codes, scale, fmt, torch.bfloat16, backend="triton")
            r_codes, r_scale = formats.quantize(w.cpu(), fmt)
            r_deq = formats.dequantize(r_codes, r_scale, fmt, torch.bfloat16)
            ok_codes = same_bits(codes.cpu(), r_codes)
            ok_scale = same_bits(scale.cpu(), r_scale)
            ok_deq = same_bits(deq.cpu(), r_deq)
            if fmt.kind is Kind.FP8:  # the grid-rounding path (the CPU tests') must agree too
                grid = kquant.quantize(w, fmt, config=GRID_FP8)[0]
                ok_codes = ok_codes and same_bits(grid.cpu(), r_codes)
            cuda_scale = formats.quantize(w, fmt)[1]
            cuda_diff = int((cuda_scale.reshape(-1) != scale.reshape(-1)).sum())
            check(
                f"quantize+dequantize {fmt.label} {shape} {dtype} vs CPU reference",
                ok_codes and ok_scale and ok_deq,
                codes=ok_codes, scales=ok_scale, dequant=ok_deq,
                torch_cuda_scales_differing=f"{cuda_diff}/{scale.numel()}",
            )  # fmt: skip
    # Edge values: exact ties, -0.0, subnormals, an all-zero row and block, huge values.
    w = randn(512, 640, std=0.02, dtype=torch.float32)
    w[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, -0.0, 1e-40, -1e-42])
    w[1] = 0.0
    w[128:256, 128:256] = 0.0
    w[384:512, 384:512] *= 1e-37  # a whole block, and a whole row, of fp32 subnormals
    w[2] *= 1e-37
    w[5, 5] = 3.0e38
    for fmt in FORMATS:
        codes, scale = dispatch.quantize(w, fmt, backend="triton")
        r_codes, r_scale = formats.quantize(w.cpu(), fmt)
        check(
            f"quantize edge values {fmt.label}",
            same_bits(codes.cpu(), r_codes) and same_bits(scale.cpu(), r_scale),
        )
    bad = w.clone()
    bad[7, 7] = float("nan")
    for fmt in FORMATS:
        try:
            dispatch.quantize(bad, fmt, backend="triton")
            check(f"NaN raises {fmt.label}", False)
        except formats.NonFiniteWeightError:
            check(f"NaN raises {fmt.label}", True)


def check_quantize_launches() -> None:
    """Every swept launch shape gives the default's bits (the default is checked against the
    CPU reference above), at the DiT sizes the timings use and on a ragged shape."""
    for shape in [*WEIGHT_SHAPES, ODD_SHAPE]:
        w = randn(*shape, std=0.02)
        for fmt in FORMATS:
            want_codes, want_scale = kquant.quantize(w, fmt)
            configs = _quantize_configs(fmt)
            bad = []
            for name, cfg in configs.items():
                codes, scale = kquant.quantize(w, fmt, config=cfg)
                if not (same_bits(codes, want_codes) and same_bits(scale, want_scale)):
                    bad.append(name)
            check(f"launch shapes {fmt.label} {shape}: same bits", not bad, differ=bad)


def check_activations() -> None:
    for kind in (Kind.INT8, Kind.FP8):
        fmt = Format(kind, Scaling.BLOCK, B)
        for k in ACT_KS:
            x = randn(ACT_ROWS, k)
            codes, scale = dispatch.quantize_activations(x, fmt, backend="triton")
            r_codes, r_scale = matmul.quantize_activations(x, kind, B)
            ok = same_bits(codes, r_codes) and torch.equal(scale, r_scale)
            check(f"activations {fmt.label} [{ACT_ROWS}, {k}]", ok)


def check_gemm() -> None:
    shapes = [*GEMM_SHAPES, ODD_GEMM]
    for m, k, n in shapes:
        x = randn(m, k)
        w = randn(n, k, std=0.02)
        bias = randn(n, std=0.1)
        exact64 = x.double() @ w.double().T + bias.double()
        for kind in (Kind.INT8, Kind.FP8):
            fmt = Format(kind, Scaling.BLOCK, B)
            codes, scale = dispatch.quantize(w, fmt)
            a_codes, a_scale = matmul.quantize_activations(x, kind, B)
            deq_a = a_codes.double() * a_scale.double().repeat_interleave(B, 1)[:, :k]
            deq_w = formats.dequantize(codes, scale, fmt, torch.float64)
            q64 = deq_a @ deq_w.T + bias.double()
            ref = dispatch.block_scaled_linear(
                x, codes, scale, fmt, bias, torch.float32, backend="torch"
            )
            backends = ["triton"] + (["scaled_mm"] if kind is Kind.FP8 else [])
            for be in backends:
                try:
                    got = dispatch.block_scaled_linear(x, codes, scale, fmt, bias, backend=be)
                    got32 = dispatch.block_scaled_linear(
                        x, codes, scale, fmt, bias, torch.float32, backend=be
                    )
                except dispatch.BackendUnavailableError as exc:
                    # Expected off a Hopper GPU (CPU smoke run) or for shapes cuBLAS can't take.
                    ok = DEV.type != "cuda" or (k % 512 != 0 or n % 128 != 0)
                    check(f"gemm {fmt.label} {be} ({m},{k},{n})", ok, skipped=str(exc)[:200])
                    continue
                e_q64 = rel(got, q64)
                e_q64_f32 = rel(got32, q64)
                e_true = rel(got, exact64)
                e_ref = rel(got32, ref)
                bound = 1e-2 if kind is Kind.INT8 else 3e-2
                # FP8 tensor-core sums keep fewer bits than fp32 (DeepSeek-V3 notes ~14): ~3e-3.
                arith = 1e-5 if kind is Kind.INT8 else 1e-2
                ok = torch.isfinite(got).all().item() and e_q64 <= bound and e_q64_f32 < arith
                check(
                    f"gemm {fmt.label} {be} ({m},{k},{n}) bf16 out",
                    bool(ok),
                    err_vs_f64_of_quantized=f"{e_q64:.2e}",
                    err_fp32out_vs_f64_of_quantized=f"{e_q64_f32:.2e}",
                    err_vs_f64_unquantized=f"{e_true:.2e}",
                    diff_vs_torch_reference=f"{e_ref:.2e}",
                )


# ------------------------------------------------------------------------------ timings


def time_quantize() -> None:
    """``of copy``: (bytes read once + written) / time over the copy's (read + write) / time.
    Per-tensor scales read the input twice (absmax pass, then codes): ``of copy, 2 reads``
    counts what those kernels really move."""
    for rows, cols in WEIGHT_SHAPES:
        sets = [(randn(rows, cols, std=0.02), randn(rows, cols)) for _ in range(3)]
        copy_ms = bench(lambda src, dst: dst.copy_(src), sets)
        nbytes = rows * cols * 2
        copy_bw = 2 * nbytes / copy_ms / 1e9
        timing(f"copy bf16 {rows}x{cols}", copy_ms, tbps=round(copy_bw, 3))
        casts = [(s[0], torch.empty(rows, cols, dtype=torch.int8, device=DEV)) for s in sets]
        ms = bench(lambda src, dst: dst.copy_(src), casts)
        bw = (nbytes + rows * cols) / ms / 1e9
        timing(f"torch cast bf16->int8 (no math) {rows}x{cols}", ms, of_copy=round(bw / copy_bw, 3))
        for fmt in FORMATS:
            scale_bytes = 4 * math.prod(fmt.scale_shape((rows, cols)))
            moved = nbytes + rows * cols + scale_bytes
            for name, cfg in _quantize_configs(fmt).items():
                try:
                    ms = bench(
                        lambda w, _, fmt=fmt, cfg=cfg: kquant.quantize(w, fmt, config=cfg), sets
                    )
                except Exception as exc:
                    log(f"!! quantize {fmt.label} [{name}]: {exc!r}"[:300])
                    continue
                bw = moved / ms / 1e9
                extra = {}
                if fmt.scaling is Scaling.TENSOR:
                    extra["of_copy_2_reads"] = round((moved + nbytes) / ms / 1e9 / copy_bw, 3)
                timing(
                    f"quantize {fmt.label} {rows}x{cols} [{name}]",
                    ms,
                    tbps=round(bw, 3),
                    of_copy=round(bw / copy_bw, 3),
                    **extra,
                )
            ms = bench(lambda w, _, fmt=fmt: dispatch.quantize(w, fmt), sets)
            timing(
                f"dispatch.quantize {fmt.label} {rows}x{cols} (+finite check)",
                ms,
                of_copy=round(moved / ms / 1e9 / copy_bw, 3),
            )
        ref_fmt = FORMATS[4]
        ms = bench(lambda w, _, ref_fmt=ref_fmt: formats.quantize(w, ref_fmt), sets[:2])
        timing(f"torch reference quantize {ref_fmt.label} {rows}x{cols}", ms)
        for fmt in (FORMATS[0], FORMATS[5]):
            q = [kquant.quantize(s[0], fmt) for s in sets]
            ms = bench(lambda c, s, fmt=fmt: dispatch.dequantize(c, s, fmt, torch.bfloat16), q)
            bw = (nbytes + rows * cols) / ms / 1e9
            timing(f"dequantize {fmt.label} {rows}x{cols}", ms, of_copy=round(bw / copy_bw, 3))


def time_gemm(quick: bool) -> None:
    """All GEMM timings are back-to-back calls on rotated inputs (``bench_stream``)."""
    for m, k, n in GEMM_SHAPES:
        flop = 2 * m * n * k
        tag = f"M={m} K={k} N={n}"
        sets = []
        for _ in range(3):
            x = randn(m, k)
            w = randn(n, k, std=0.02)
            q = {kind: dispatch.quantize(w, Format(kind, Scaling.BLOCK, B)) for kind in Kind}
            sets.append((x, w, q))

        def tflops(ms: float, flop: int = flop) -> float:
            return round(flop / ms / 1e9, 1)

        bf16_ms = bench_stream(lambda x, w, q: torch.matmul(x, w.T), sets)
        timing(f"bf16 matmul {tag}", bf16_ms, tflops=tflops(bf16_ms))
        bf16_graph_ms = bench_graph(lambda x, w, q: torch.matmul(x, w.T), sets)
        timing(f"bf16 matmul (graph) {tag}", bf16_graph_ms, tflops=tflops(bf16_graph_ms))
        int8_fmt = Format(Kind.INT8, Scaling.BLOCK, B)
        deq_ms = bench_stream(
            lambda x, w, q, fmt=int8_fmt: torch.matmul(
                x, dispatch.dequantize(*q[Kind.INT8], fmt, torch.bfloat16).T
            ),
            sets,
        )
        timing(f"dequantize+bf16 matmul {tag}", deq_ms, vs_bf16=round(bf16_ms / deq_ms, 3))
        x8 = [(torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8), s[2]) for s in sets]
        ms = bench_stream(lambda a, q: torch._int_mm(a, q[Kind.INT8][0].T), x8)
        timing(f"torch._int_mm (no scales) {tag}", ms, vs_bf16=round(bf16_ms / ms, 3))
        try:
            one = torch.tensor(1.0, device=DEV)
            f8 = [(s[0].to(torch.float8_e4m3fn), s[2][Kind.FP8][0]) for s in sets]
            ms = bench_stream(
                lambda a, wc, one=one: torch._scaled_mm(
                    a, wc.T, one, one, out_dtype=torch.bfloat16
                ),
                f8,
            )
            timing(f"torch._scaled_mm fp8 per-tensor {tag}", ms, vs_bf16=round(bf16_ms / ms, 3))
        except Exception as exc:
            log(f"!! per-tensor scaled_mm: {exc!r}"[:500])

        best_act: dict[Kind, tuple[float, str]] = {}
        for kind in Kind:
            fmt = Format(kind, Scaling.BLOCK, B)
            moved = m * k * 3
            for name, cfg in ACT_LAUNCH.items():
                ms = bench_graph(
                    lambda x, w, q, kind=kind, cfg=cfg: kquant.quantize_activations(
                        x, fp8=kind is Kind.FP8, block_size=B, config=cfg
                    ),
                    sets,
                )
                timing(
                    f"quantize activations {fmt.label} [{name}] {tag}",
                    ms,
                    tbps=round(moved / ms / 1e9, 3),
                )
                if kind not in best_act or ms < best_act[kind][0]:
                    best_act[kind] = (ms, name)
        best: dict[Kind, tuple[float, str]] = {}
        for kind, configs in ((Kind.INT8, INT8_CONFIGS), (Kind.FP8, FP8_CONFIGS)):
            fmt = Format(kind, Scaling.BLOCK, B)
            qa = [(*dispatch.quantize_activations(s[0], fmt), *s[2][kind]) for s in sets]
            for name, cfg in configs.items():
                if quick and name != next(iter(configs)):
                    continue
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
                        {"section": f"{kind} {name} {tag}", "error": repr(exc)[:1500]}
                    )
                    log(f"!! config {name}: {exc!r}"[:1500])
                    continue
                timing(
                    f"gemm-only {fmt.label} triton {name} {tag}",
                    ms,
                    tflops=tflops(ms),
                    vs_bf16=round(bf16_ms / ms, 3),
                )
                if not (cfg and cfg.no_scale) and (kind not in best or ms < best[kind][0]):
                    best[kind] = (ms, name)
            if kind is Kind.FP8:
                try:
                    ms = bench_stream(
                        lambda ac, asc, wc, ws: block_gemm.fp8_scaled_mm(
                            ac, asc, wc, ws, bias=None, out_dtype=torch.bfloat16
                        ),
                        qa,
                    )
                    timing(
                        f"gemm-only {fmt.label} scaled_mm {tag}",
                        ms,
                        tflops=tflops(ms),
                        vs_bf16=round(bf16_ms / ms, 3),
                    )
                except Exception as exc:
                    log(f"!! scaled_mm: {exc!r}"[:500])

        # Full paths (activation quantization included), as the runtime calls them.
        for kind in Kind:
            fmt = Format(kind, Scaling.BLOCK, B)
            cfg_name = best[kind][1] if kind in best else "default"
            cfg = (INT8_CONFIGS if kind is Kind.INT8 else FP8_CONFIGS).get(cfg_name)
            act_name = best_act[kind][1]

            def full_triton(x, w, q, kind=kind, cfg=cfg, act_cfg=ACT_LAUNCH[act_name]):
                ac, asc = kquant.quantize_activations(
                    x, fp8=kind is Kind.FP8, block_size=B, config=act_cfg
                )
                return block_gemm.block_scaled_mm(
                    ac, asc, *q[kind], block_size=B, bias=None, out_dtype=x.dtype, config=cfg
                )

            ms = bench_stream(full_triton, sets)
            timing(
                f"FULL {fmt.label} triton[{cfg_name},{act_name}] {tag}",
                ms,
                tflops=tflops(ms),
                vs_bf16=round(bf16_ms / ms, 3),
                vs_dequant_bf16=round(deq_ms / ms, 3),
            )

            def full_dispatch(x, w, q, fmt=fmt, kind=kind):
                return dispatch.block_scaled_linear(x, *q[kind], fmt)

            ms = bench_stream(full_dispatch, sets)
            choice = dispatch.choose_block_linear(sets[0][0], sets[0][2][kind][0], fmt).backend
            timing(
                f"FULL {fmt.label} dispatch[{choice}] {tag}",
                ms,
                tflops=tflops(ms),
                vs_bf16=round(bf16_ms / ms, 3),
                vs_dequant_bf16=round(deq_ms / ms, 3),
            )
            try:
                ms = bench_graph(full_dispatch, sets)
                timing(
                    f"FULL {fmt.label} dispatch[{choice}] (graph) {tag}",
                    ms,
                    tflops=tflops(ms),
                    vs_bf16_graph=round(bf16_graph_ms / ms, 3),
                    vs_dequant_bf16=round(deq_ms / ms, 3),
                )
            except Exception as exc:
                log(f"!! graph {fmt.label}: {exc!r}"[:300])


def env() -> None:
    REC.env(scaled_mm_blockwise=dispatch._scaled_mm_problem(DEV) or "supported")


def summary() -> None:
    card = REC.card()
    fails = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    log("")
    log(f"=== kernels on {card} ===")
    log(f"checks: {len(RESULTS['checks']) - len(fails)}/{len(RESULTS['checks'])} ok")
    for name in fails:
        log(f"  FAIL {name}")
    for c in RESULTS["checks"]:
        if c["name"].startswith("gemm"):
            extra = {k: v for k, v in c.items() if k not in ("name", "ok")}
            log(f"  {c['name']}: {extra}")
    log(f"{'timing':62s} {'us':>9s}  ratios")
    for t in RESULTS["timings"]:
        extra = " ".join(f"{k}={v}" for k, v in t.items() if k not in ("name", "ms"))
        log(f"{t['name'][:62]:62s} {t['ms'] * 1e3:9.1f}  {extra}")
    for e in RESULTS["errors"]:
        log(f"ERROR {e['section']}: {e['error'][:300]}")


def cpu_smoke() -> int:
    """Run the correctness sections on tiny shapes on CPU (TRITON_INTERPRET=1 must be set)."""
    global WEIGHT_SHAPES, GEMM_SHAPES, ODD_SHAPE, ODD_GEMM, ACT_ROWS, ACT_KS
    WEIGHT_SHAPES, ODD_SHAPE = [(256, 384)], (200, 300)
    GEMM_SHAPES, ODD_GEMM = [(64, 256, 256)], (40, 200, 136)
    ACT_ROWS, ACT_KS = 40, (256, 200)
    guarded("check quantize", check_quantize)
    guarded("check quantize launches", check_quantize_launches)
    guarded("check activations", check_activations)
    guarded("check gemm", check_gemm)
    summary()
    return 0 if REC.ok() else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one GEMM config per kind")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--quantize-only", action="store_true", help="no GEMM sections")
    parser.add_argument("--workers", type=int, default=14, help="precompile processes (0: none)")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="checks only, tiny shapes, Triton interpreter"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.cpu_smoke:
        return cpu_smoke()
    guarded("env", env)
    jobs = [(i, name) for i, fmt in enumerate(FORMATS) for name in _quantize_configs(fmt)]
    futures = start_precompile(_warm_quantize, jobs, args.workers) if args.workers else []
    if not args.skip_checks:
        guarded("check quantize", check_quantize)
        guarded("check quantize launches", check_quantize_launches)
        guarded("check activations", check_activations)
        guarded("check gemm", check_gemm)
    wait_precompile(futures)
    guarded("time quantize", time_quantize)
    if args.quantize_only:
        return finish()
    guarded("time gemm", lambda: time_gemm(args.quick))
    return finish()


def finish() -> int:
    out = Path(os.environ.get("OUT", "/tmp")) / "kernels.json"
    out.write_text(json.dumps(RESULTS, indent=1))
    summary()
    return 0 if REC.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
