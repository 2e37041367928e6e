"""Learned rounding: quality on real MiniLM activations (CPU) and speed on a GPU, one script.

CPU (default): record calibration statistics from real forward passes of MiniLM-L6 over
standard-library docstrings, then for every Linear layer compare held-out output SQNR of
round-to-nearest, a plain GPTQ baseline (column by column, natural order, written here
independently of the package), the data-free SVD proxy (unguarded, as the reference tool
ships it, and guarded), and our learned rounding; then the last hidden state vs float32.

    .venv/bin/python bench/learned_rounding.py [--json out.json] [--quick]

GPU (``--gpu``): kernel checks against the PyTorch reference, then time learned rounding of a
3072×12288 layer (and its transpose) with 4096 calibration rows against our round-to-nearest
(``dispatch.quantize``, Triton) in the same run, for each matmul precision, plus a batched
case. Prints a table last.

    bash bench/gpu.sh bench/learned_rounding.py --gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from comfyui_quantizer.quant_core import dispatch, error_feedback, formats  # noqa: E402
from comfyui_quantizer.quant_core.calibration import (  # noqa: E402
    CalibrationRecorder,
    LayerStats,
    Moments,
)
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling  # noqa: E402
from comfyui_quantizer.quant_core.learned import (  # noqa: E402
    LearnedOptions,
    OutputObjective,
    learn_codes,
    matmul_precision,
)
from comfyui_quantizer.quant_core.quantizer import quantize_layer  # noqa: E402

FORMATS = {
    "int8/row": Format(Kind.INT8, Scaling.ROW),
    "fp8/tensor": Format(Kind.FP8, Scaling.TENSOR),
}


# ---------------------------------------------------------------------------------------------
# shared helpers


def output_energy(e: torch.Tensor, m: Moments, centre: torch.Tensor | None = None) -> float:
    """``E‖(x − c) eᵀ‖²`` over the rows of ``m`` in float64 (``c`` = 0 without ``centre``)."""
    ed = e.double()
    energy = ((ed @ m.second_moment.double()) * ed).sum()
    if centre is not None:
        ec = ed @ centre.double()
        em = ed @ m.mean.double()
        energy = energy - 2 * (ec * em).sum() + (ec * ec).sum()
    return float(energy)


def sqnr(w: torch.Tensor, w_hat: torch.Tensor, m: Moments, centre=None) -> float:
    return formats.sqnr_db(output_energy(w, m), output_energy(w - w_hat, m, centre))


def plain_gptq(w: torch.Tensor, fmt: Format, h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """GPTQ as published (natural column order, inverse-Hessian Cholesky, lazy batches of 128),
    written independently of the package: ``w [out, in]`` -> dequantized weights."""
    w = w.double().clone()
    scale = formats.compute_scale(w.float(), fmt).double()
    s = formats.expand_scale(scale, tuple(w.shape), fmt).expand_as(w)
    h = h.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    out = torch.empty_like(w)
    n = w.shape[1]
    for b0 in range(0, n, 128):
        b1 = min(n, b0 + 128)
        blk = w[:, b0:b1].clone()
        err = torch.empty_like(blk)
        for j in range(b1 - b0):
            col = blk[:, j]
            sj = s[:, b0 + j]
            q = formats.round_to_grid((col / sj).float(), fmt.kind).double() * sj
            out[:, b0 + j] = q
            e = (col - q) / u[b0 + j, b0 + j]
            blk[:, j + 1 :] -= e[:, None] * u[b0 + j, b0 + j + 1 : b1][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return out.float()


# ---------------------------------------------------------------------------------------------
# CPU: MiniLM acceptance


def minilm_data(n_cal: int, n_held: int, seed: int):
    import minilm

    folder = minilm.model_dir()
    weights = minilm.load_weights(folder)
    model = minilm.MiniBert.from_weights(weights, folder)
    ids = minilm.token_sequences(minilm.stdlib_docstrings(), folder)
    perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
    ids = ids[perm]
    if n_cal + n_held > ids.shape[0]:
        raise SystemExit(f"only {ids.shape[0]} sequences of text")
    return model, weights, ids[:n_cal], ids[n_cal : n_cal + n_held]


def record(model, batches: torch.Tensor, holdout: float) -> dict[str, LayerStats]:
    with CalibrationRecorder(model, holdout=holdout) as rec, torch.no_grad():
        for b in batches.split(16):
            model(b)
    return rec.stats()


def run_model(model, ids: torch.Tensor, replace: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden state with some parameters replaced (dequantized weights, biases)."""
    state = model.state_dict()
    saved = {k: state[k].clone() for k in replace}
    try:
        with torch.no_grad():
            for k, v in replace.items():
                state[k].copy_(v)
            return torch.cat([model(b) for b in ids.split(32)])
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                state[k].copy_(v)


def cpu_bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, weights, cal_ids, held_ids = minilm_data(args.cal, args.held, args.seed)
    cal = record(model, cal_ids, holdout=0.25)  # fit rows + check rows for the guard
    held = record(model, held_ids, holdout=0.0)  # evaluation only: never seen by any method
    print(
        f"MiniLM: {cal_ids.numel()} calibration tokens (25% held back for the guard), "
        f"{held_ids.numel()} held-out tokens; statistics in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    layers = sorted(cal, key=lambda k: (k.split(".")[:3], k))
    if args.quick:
        layers = layers[:: max(1, len(layers) // 6)]
    options = LearnedOptions()
    svd_options = LearnedOptions(objective="svd")
    results: dict = {"layers": {}, "model": {}}
    y_ref = run_model(model, held_ids, {})
    for label, fmt in FORMATS.items():
        rows = {}
        swaps = {"rtn": {}, "learned": {}, "learned+bc": {}}
        for key in layers:
            w = weights[key].float()
            bias_key = key[: -len("weight")] + "bias"
            bias = weights.get(bias_key)
            st = cal[key]
            ev = held[key].fit
            r = {}
            t = time.perf_counter()
            rtn = quantize_layer(w, fmt, rounding="nearest")
            r["rtn_s"] = time.perf_counter() - t
            rtn_hat = formats.dequantize(rtn.codes, rtn.scale, fmt)
            r["rtn"] = sqnr(w, rtn_hat, ev)
            t = time.perf_counter()
            g_hat = plain_gptq(w, fmt, st.fit.second_moment)
            r["gptq_s"] = time.perf_counter() - t
            r["gptq"] = sqnr(w, g_hat, ev)
            # data-free proxy: what the reference tool ships (no guard), and ours (guarded)
            t = time.perf_counter()
            svd = quantize_layer(w, fmt, rounding="learned", stats=st, options=svd_options)
            r["svd_s"] = time.perf_counter() - t
            r["svd_unguarded"] = sqnr(w, _search_hat(w, fmt, svd_options, args.seed), ev)
            # the same proxy moved by AdamW on continuous values, closer to the reference tool
            svd_adam = replace(svd_options, optimizer="adamw", lr=0.01)
            r["svd_adamw"] = sqnr(w, _search_hat(w, fmt, svd_adam, args.seed), ev)
            r["svd_guarded"] = sqnr(w, formats.dequantize(svd.codes, svd.scale, fmt), ev)
            r["svd_kept"] = svd.extra.get("kept")
            # ours, rounding only (bias untouched) and with bias correction
            t = time.perf_counter()
            lr = quantize_layer(w, fmt, rounding="learned", stats=st, options=_no_bc(options))
            r["learned_s"] = time.perf_counter() - t
            l_hat = formats.dequantize(lr.codes, lr.scale, fmt)
            r["learned"] = sqnr(w, l_hat, ev)
            r["kept"] = lr.extra.get("kept")
            r["iterations"] = lr.extra.get("iterations")
            r["fit_gain_db"] = 10 * math.log10(lr.extra["fit_loss_rtn"] / lr.extra["fit_loss"])
            r["weight_sqnr_rtn"] = rtn.weight_sqnr_db
            r["weight_sqnr_learned"] = lr.weight_sqnr_db
            lb = quantize_layer(w, fmt, rounding="learned", stats=st, bias=bias, options=options)
            lb_hat = formats.dequantize(lb.codes, lb.scale, fmt)
            r["learned+bc"] = sqnr(w, lb_hat, ev, st.fit.mean if lb.bias is not None else None)
            rows[key] = r
            swaps["rtn"][key] = rtn_hat
            swaps["learned"][key] = l_hat
            swaps["learned+bc"][key] = lb_hat
            if lb.bias is not None:
                swaps["learned+bc"][bias_key] = lb.bias
            print(
                f"  {label:10s} {key:48s} rtn {r['rtn']:6.2f}  gptq {r['gptq'] - r['rtn']:+5.2f}"
                f"  svd {r['svd_unguarded'] - r['rtn']:+5.2f}/{r['svd_adamw'] - r['rtn']:+5.2f}"
                f"/{r['svd_guarded'] - r['rtn']:+5.2f}"
                f"  learned {r['learned'] - r['rtn']:+5.2f}  +bc {r['learned+bc'] - r['rtn']:+5.2f}"
                f"  ({r['learned_s']:.1f} s, {r['iterations']} it, {r['kept']})",
                flush=True,
            )
        results["layers"][label] = rows
        model_rows = {}
        for name, rep in swaps.items():
            y = run_model(model, held_ids, rep)
            cos = torch.nn.functional.cosine_similarity(y, y_ref, dim=-1).mean().item()
            rel = ((y - y_ref).norm() / y_ref.norm()).item()
            model_rows[name] = {"cosine": cos, "rel_error": rel}
        results["model"][label] = model_rows
    results["tokens"] = {"calibration": cal_ids.numel(), "held_out": held_ids.numel()}
    return results


def _no_bc(o: LearnedOptions) -> LearnedOptions:
    return replace(o, bias_correction=False)


def _search_hat(w: torch.Tensor, fmt: Format, options: LearnedOptions, seed: int):
    """The SVD-proxy search result itself, before any guard (the reference tool's output)."""
    from comfyui_quantizer.quant_core.learned import svd_objective
    from comfyui_quantizer.quant_core.quantizer import scale_3d

    scale = formats.compute_scale(w, fmt)
    s3 = scale_3d(scale, w.shape, fmt)
    res = learn_codes(w[None], s3, fmt.kind, svd_objective(w[None], options, seed), options)
    return (res.codes[0] * s3[0]).float()


def print_cpu(results: dict) -> None:
    cols = ["rtn", "gptq", "svd_unguarded", "svd_adamw", "svd_guarded", "learned", "learned+bc"]
    for label, rows in results["layers"].items():
        n = len(rows)
        print(f"\n{label}: held-out output SQNR, gain over round-to-nearest (dB), {n} layers")
        print(f"{'':22s}" + "".join(f"{c:>14s}" for c in cols))
        mean = {c: statistics.mean(r[c] - (0 if c == "rtn" else r["rtn"]) for r in rows.values())
                for c in cols}  # fmt: skip
        worst = {c: min(r[c] - r["rtn"] for r in rows.values()) for c in cols if c != "rtn"}
        print(f"{'mean':22s}" + "".join(f"{mean[c]:14.2f}" for c in cols))
        print(f"{'worst layer':22s}{'':14s}" + "".join(f"{worst[c]:14.2f}" for c in cols[1:]))
        learned_beats_gptq = sum(r["learned"] > r["gptq"] for r in rows.values())
        kept = sum(r["kept"] == "learned" for r in rows.values())
        t_rtn = sum(r["rtn_s"] for r in rows.values())
        t_learned = sum(r["learned_s"] for r in rows.values())
        print(
            f"learned beats GPTQ on {learned_beats_gptq}/{n} layers; guard kept learned codes on "
            f"{kept}/{n}; SVD proxy kept by its guard on "
            f"{sum(r['svd_kept'] == 'learned' for r in rows.values())}/{n}; "
            f"CPU time learned {t_learned:.1f} s vs RTN {t_rtn:.2f} s"
        )
        for name, m in results["model"][label].items():
            print(
                f"  last hidden state {name:11s}: cosine {m['cosine']:.6f}  "
                f"relative error {m['rel_error']:.5f}"
            )


# ---------------------------------------------------------------------------------------------
# GPU: kernel checks and speed


def synthetic_stats(
    n: int, features: int, seed: int, device, n_check: int = 0
) -> tuple[torch.Tensor, Moments, Moments | None]:
    """Correlated, heavy-channel inputs ``[n, features]`` and their moments (float32), plus
    the moments of ``n_check`` more rows from the same distribution."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = 64
    mix = torch.randn(rank, features, generator=g, device=device) / math.sqrt(rank)
    channel = torch.exp(0.8 * torch.randn(features, generator=g, device=device))

    def draw(rows: int) -> torch.Tensor:
        z = torch.randn(rows, features, generator=g, device=device)
        return (z + 2.0 * torch.randn(rows, rank, generator=g, device=device) @ mix) * channel

    def moments(x: torch.Tensor) -> Moments:
        with matmul_precision("highest", x.device):
            h = x.T @ x / x.shape[0]
        return Moments(h, x.mean(0), x.abs().amax(), x.shape[0])

    x = draw(n)
    check = moments(draw(n_check)) if n_check else None
    return x, moments(x), check


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, reps: int = 3) -> tuple[float, object]:
    """Median wall time of ``fn`` (synchronized), after one warm-up call."""
    out = fn()
    _sync()
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def kernel_checks(device) -> list[str]:
    from comfyui_quantizer.kernels.gptq import gptq_block

    lines = []
    g = torch.Generator(device=device).manual_seed(1)
    for kind in (Kind.INT8, Kind.FP8):
        for layers, rows, width, per_col in ((2, 300, 128, False), (1, 77, 96, True)):
            w = torch.randn(layers, rows, width, generator=g, device=device) * 0.05
            t = w + 0.01 * torch.randn(layers, rows, width, generator=g, device=device)
            s = w.abs().amax(-1, keepdim=True) / (127 if kind is Kind.INT8 else 448)
            if per_col:
                s = s * (1 + torch.rand(layers, rows, width, generator=g, device=device))
            u = torch.triu(torch.randn(layers, width, width, generator=g, device=device) * 0.1, 1)
            outs = [torch.full_like(w, float("nan")) for _ in range(4)]
            e_ref = error_feedback._block_reference(t, w, s, u, kind, outs[0], outs[1])
            e_tri = gptq_block(t, w, s, u, kind.value, outs[2], outs[3])
            same = torch.equal(outs[0], outs[2])
            d_pre = (outs[1] - outs[3]).abs().max().item()
            d_err = (e_ref - e_tri).abs().max().item()
            ok = same and not torch.isnan(outs[2]).any() and d_err <= 1e-6 * w.abs().max().item()
            lines.append(
                f"gptq_block {kind.value} {layers}x{rows}x{width} per-col={per_col}: codes equal "
                f"{same}, max |Δpre| {d_pre:.1e}, max |Δerr| {d_err:.1e} "
                f"-> {'OK' if ok else 'FAIL'}"
            )
    # the whole feedback: Triton blocks vs PyTorch blocks, same matmuls (full fp32)
    w = torch.randn(1, 512, 1024, generator=g, device=device) * 0.02
    _, m, _ = synthetic_stats(2048, 1024, 5, device)
    for kind in (Kind.INT8, Kind.FP8):
        s = w.abs().amax(-1, keepdim=True) / (127 if kind is Kind.INT8 else 448)
        with matmul_precision("highest", w.device):
            c_ref, _ = error_feedback.error_feedback(
                w, s, m.second_moment[None], kind, backend="torch"
            )
            c_tri, _ = error_feedback.error_feedback(
                w, s, m.second_moment[None], kind, backend="triton"
            )
        frac = (c_ref == c_tri).float().mean().item()
        lines.append(f"error_feedback {kind.value} 512x1024 Triton vs PyTorch: {frac:.6f} equal")
    return lines


def gpu_bench(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "CPU smoke run" if args.smoke else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    try:
        checks, kernel_ok = kernel_checks(device), True
    except Exception as e:  # report it and still time the PyTorch path
        checks, kernel_ok = [f"Triton kernel FAILED: {type(e).__name__}: {e}"], False
    results: dict = {"device": name, "checks": checks, "timings": []}
    for line in results["checks"]:
        print(line, flush=True)
    div = 16 if args.smoke else 1
    n_cal = 4096 // div
    for out_f, in_f in ((3072 // div, 12288 // div), (12288 // div, 3072 // div)):
        x, fit, check = synthetic_stats(n_cal, in_f, 10, device, n_check=1024 // div)
        stats = LayerStats(fit, check)
        t_stats, _ = cuda_time(lambda x=x: x.T @ x, reps=2)
        del x
        g = torch.Generator(device=device).manual_seed(3)
        w = torch.randn(out_f, in_f, generator=g, device=device) * 0.02
        backend = "triton" if device.type == "cuda" and kernel_ok else "torch"
        for label, fmt in FORMATS.items():
            # our RTN as the conversion runs it: through the dispatcher (Triton on CUDA)
            t_rtn, _ = cuda_time(lambda w=w, fmt=fmt: dispatch.quantize(w, fmt), reps=5)
            # the default (tf32, early stopping), the other precisions, and all 48 steps forced
            steps = LearnedOptions().num_iter
            variants = [("tf32", {}), ("bf16", {}), ("tf32", {"early_stop": steps + 1})]
            if args.highest:
                variants.append(("highest", {}))
            for precision, more in variants:
                opts = LearnedOptions(precision=precision, bias_correction=False, **more)

                def learned(w=w, fmt=fmt, opts=opts, stats=stats, backend=backend):
                    return quantize_layer(
                        w, fmt, rounding="learned", stats=stats, options=opts, backend=backend
                    )

                t_l, res = cuda_time(learned, reps=2)
                e = res.extra
                row = {
                    "shape": [out_f, in_f],
                    "format": label,
                    "precision": precision + (f"/all-{steps}-steps" if more else ""),
                    "learned_s": t_l,
                    "rtn_s": t_rtn,
                    "ratio": t_l / t_rtn,
                    "fit_gain_db": 10 * math.log10(e["fit_loss_rtn"] / e["fit_loss"]),
                    "ef_gain_db": 10 * math.log10(e["fit_loss_rtn"] / e["fit_loss_start"]),
                    "held_gain_db": res.output_sqnr_db - e["rtn_output_sqnr_db"],
                    "iterations": e["iterations"],
                    "kept": e["kept"],
                    "stats_matmul_s": t_stats,
                }
                row.update(_breakdown(w, fmt, stats, opts, backend))
                results["timings"].append(row)
                print(
                    f"{out_f}x{in_f} {label:10s} {row['precision']:7s} learned {t_l * 1e3:7.1f} ms "
                    f"(feedback {row['feedback_s'] * 1e3:.1f}, search {row['search_s'] * 1e3:.1f}"
                    f", {row['syncs']} syncs / {e['iterations']} it) RTN {t_rtn * 1e3:.2f} ms "
                    f"ratio {t_l / t_rtn:.0f}x  fit gain {row['fit_gain_db']:+.2f} dB "
                    f"(feedback {row['ef_gain_db']:+.2f}), held-out {row['held_gain_db']:+.2f}",
                    flush=True,
                )
        del stats, fit, check
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["batched"] = _batched(
        device, div, "triton" if device.type == "cuda" and kernel_ok else "torch"
    )
    return results


def _breakdown(w, fmt, stats: LayerStats, opts: LearnedOptions, backend: str) -> dict:
    """Time the two stages apart and count host syncs inside the search."""
    from comfyui_quantizer.quant_core.quantizer import scale_3d

    scale = formats.compute_scale(w, fmt)
    s3 = scale_3d(scale, w.shape, fmt)
    h = stats.fit.second_moment[None]
    with matmul_precision(opts.precision, w.device):
        t_ef, start = cuda_time(
            lambda: error_feedback.error_feedback(
                w[None], s3, h, fmt.kind, damp=opts.damp, backend=backend
            ),
            reps=2,
        )
        low = opts.precision == "bf16"
        obj = OutputObjective(error_feedback.damped(h, opts.damp), bf16=low)
        t_s, _ = cuda_time(lambda: learn_codes(w[None], s3, fmt.kind, obj, opts, start=start), 2)
        caught = []
        if w.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                learn_codes(w[None], s3, fmt.kind, obj, opts, start=start)
            torch.cuda.set_sync_debug_mode("default")
    return {"feedback_s": t_ef, "search_s": t_s, "syncs": len(caught)}


def _batched(device, div: int, backend: str) -> dict:
    """Four 3072×3072 layers: one batched search vs four single ones."""
    layers, out_f, in_f = 4, 3072 // div, 3072 // div
    g = torch.Generator(device=device).manual_seed(7)
    w = torch.randn(layers, out_f, in_f, generator=g, device=device) * 0.02
    hs = torch.stack([synthetic_stats(2048 // div, in_f, 20 + i, device)[1].second_moment
                      for i in range(layers)])  # fmt: skip
    s = w.abs().amax(-1, keepdim=True) / 127
    opts = LearnedOptions()

    def run(ws, ss, hh):
        with matmul_precision(opts.precision, device):
            start = error_feedback.error_feedback(ws, ss, hh, Kind.INT8, backend=backend)
            obj = OutputObjective(error_feedback.damped(hh, opts.damp))
            return learn_codes(ws, ss, Kind.INT8, obj, opts, start=start)

    t_batch, _ = cuda_time(lambda: run(w, s, hs), reps=2)
    t_single, _ = cuda_time(
        lambda: [run(w[i : i + 1], s[i : i + 1], hs[i : i + 1]) for i in range(layers)], reps=2
    )
    line = (
        f"batched: 4 layers 3072x3072 int8/row in one search {t_batch * 1e3:.1f} ms vs "
        f"{t_single * 1e3:.1f} ms one by one ({t_single / t_batch:.2f}x)"
    )
    print(line, flush=True)
    return {"batched_s": t_batch, "single_s": t_single, "line": line}


def print_gpu(results: dict) -> None:
    print(f"\n== learned rounding on {results['device']} ==")
    for line in results["checks"]:
        print(line)
    print(
        f"{'shape':12s} {'format':10s} {'precision':20s} {'learned ms':>10s} {'RTN ms':>8s} "
        f"{'ratio':>6s} {'fit dB':>7s} {'held dB':>8s} {'iters':>5s}"
    )
    for r in results["timings"]:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{shape:12s} {r['format']:10s} {r['precision']:20s} {r['learned_s'] * 1e3:10.1f} "
            f"{r['rtn_s'] * 1e3:8.2f} {r['ratio']:6.0f} {r['fit_gain_db']:+7.2f} "
            f"{r['held_gain_db']:+8.2f} {r['iterations']:5d}"
        )
    print(results["batched"]["line"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="kernel checks and timings on CUDA")
    p.add_argument("--json", help="write all numbers here (default: $OUT/learned_rounding.json)")
    p.add_argument("--cal", type=int, default=512, help="calibration sequences (128 tokens)")
    p.add_argument("--held", type=int, default=256, help="held-out sequences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="every 6th layer only")
    p.add_argument("--smoke", action="store_true", help="--gpu code path on the CPU, tiny sizes")
    p.add_argument("--highest", action="store_true", help="--gpu: also time full-fp32 matmuls")
    args = p.parse_args()
    if args.smoke:
        # the Triton interpreter must be chosen before any kernel is defined
        os.environ["TRITON_INTERPRET"] = "1"
        args.gpu = True
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = gpu_bench(args) if args.gpu else cpu_bench(args)
    out = args.json or (Path(os.environ["OUT"]) / "learned_rounding.json" if "OUT" in os.environ
                        else None)  # fmt: skip
    if out:
        Path(out).write_text(json.dumps(results, indent=2, default=str))
    (print_gpu if args.gpu else print_cpu)(results)


if __name__ == "__main__":
    main()
