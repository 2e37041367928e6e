"""One sampler step of a Flux-shaped block stack: bf16 against pack-only quantized layers.

The stack is written here in plain PyTorch with Flux.1's shapes (hidden 3072, 24 heads of 128,
MLP ratio 4, double blocks with separate image/text streams, single blocks with the fused
``linear1``/``linear2``), random weights, and one Euler step ``x + dt * v``. Every block linear
(modulation, qkv, proj, MLPs, linear1/2) is either a bf16 weight or, for the quantized runs, the
codes and scale of a pack-only format run through ``nodes.layout_math.linear`` -- the very
function the ComfyUI layouts' ``aten.linear`` handler calls, so the block-scaled GEMM kernel
(``quant_core.dispatch.block_scaled_linear``) is used whenever this checkout has it.

Correctness: the velocity ``v`` and the next latent of each run are compared with an fp32 run of
the original (unquantized) weights. The bound for a quantized run: its error is at most twice
the error of the same codes run on the exact dequantize path in bf16 (the kernel also
quantizes activations per 1 x B, which the dequantize path does not).

    bash bench/gpu.sh bench/runtime_flux.py [--double 2 --single 4 --tokens 4096 ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from comfyui_quantizer.nodes import layout_math
from comfyui_quantizer.quant_core import formats

Linear = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    hidden: int = 3072
    heads: int = 24
    mlp_ratio: int = 4
    double: int = 2
    single: int = 4
    img_tokens: int = 4096  # a 1024 x 1024 image: 128 x 128 latent, 2 x 2 patches
    txt_tokens: int = 512
    in_channels: int = 64  # 16 latent channels x 2 x 2 patch


def layer_shapes(s: Shape) -> dict[str, tuple[int, int]]:
    """``name -> [out, in]`` of every linear of the stack (Flux.1 key names)."""
    h, mlp = s.hidden, s.hidden * s.mlp_ratio
    shapes: dict[str, tuple[int, int]] = {"img_in": (h, s.in_channels), "final": (s.in_channels, h)}
    for i in range(s.double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            shapes[f"{p}_mod.lin"] = (6 * h, h)
            shapes[f"{p}_attn.qkv"] = (3 * h, h)
            shapes[f"{p}_attn.proj"] = (h, h)
            shapes[f"{p}_mlp.0"] = (mlp, h)
            shapes[f"{p}_mlp.2"] = (h, mlp)
    for i in range(s.single):
        p = f"single_blocks.{i}"
        shapes[f"{p}.modulation.lin"] = (3 * h, h)
        shapes[f"{p}.linear1"] = (3 * h + mlp, h)
        shapes[f"{p}.linear2"] = (h, h + mlp)
    return shapes


def quantized_layer(name: str) -> bool:
    """Block linears are quantized; the tiny input/output projections stay bf16."""
    return "blocks." in name


def make_weights(s: Shape, device: str, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random bf16 ``(weight, bias)`` per layer: N(0, 1/fan_in) with a few 8x outliers."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, (o, i) in layer_shapes(s).items():
        w = torch.randn(o, i, generator=g, device=device) / math.sqrt(i)
        w = torch.where(torch.rand(o, i, generator=g, device=device) < 1e-3, w * 8, w)
        b = torch.randn(o, generator=g, device=device) * 0.02
        out[name] = (w.to(torch.bfloat16), b.to(torch.bfloat16))
    return out


def rope_tables(tokens: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(tokens, device=device, dtype=torch.float32)
    freqs = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    ang = pos[:, None] * freqs[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]`` rotated pairwise (fp32 math, back to ``x.dtype``)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)


def ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, L, 3 * H * D]`` -> q, k, v each ``[B, H, L, D]``."""
    b, seq, _ = x.shape
    return x.view(b, seq, 3, n, -1).permute(2, 0, 3, 1, 4).unbind(0)


def attention(q, k, v, rope):
    q, k = apply_rope(rms(q), *rope), apply_rope(rms(k), *rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def double_block(i: int, img, txt, vec, rope, s: Shape, lin: Linear):
    p = f"double_blocks.{i}"
    mods = {}
    for side in ("img", "txt"):
        mods[side] = lin(f"{p}.{side}_mod.lin", F.silu(vec))[:, None, :].chunk(6, dim=-1)
    qkv = {}
    for side, x in (("img", img), ("txt", txt)):
        sh1, sc1, *_ = mods[side]
        qkv[side] = heads(lin(f"{p}.{side}_attn.qkv", ln(x) * (1 + sc1) + sh1), s.heads)
    q, k, v = (torch.cat((qkv["txt"][j], qkv["img"][j]), dim=2) for j in range(3))
    attn = attention(q, k, v, rope)
    txt_a, img_a = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
    out = {}
    for side, x, a in (("img", img, img_a), ("txt", txt, txt_a)):
        _, _, g1, sh2, sc2, g2 = mods[side]
        x = x + g1 * lin(f"{p}.{side}_attn.proj", a)
        hmid = F.gelu(lin(f"{p}.{side}_mlp.0", ln(x) * (1 + sc2) + sh2), approximate="tanh")
        out[side] = x + g2 * lin(f"{p}.{side}_mlp.2", hmid)
    return out["img"], out["txt"]


def single_block(i: int, x, vec, rope, s: Shape, lin: Linear):
    p = f"single_blocks.{i}"
    sh, sc, g = lin(f"{p}.modulation.lin", F.silu(vec))[:, None, :].chunk(3, dim=-1)
    fused = lin(f"{p}.linear1", ln(x) * (1 + sc) + sh)
    qkv, mlp = fused.split([3 * s.hidden, s.mlp_ratio * s.hidden], dim=-1)
    attn = attention(*heads(qkv, s.heads), rope)
    return x + g * lin(f"{p}.linear2", torch.cat((attn, F.gelu(mlp, approximate="tanh")), -1))


def euler_step(latent, txt, vec, rope, s: Shape, lin: Linear, dt: float = -0.05):
    """``v = model(latent)``; returns ``(v, latent + dt * v)``."""
    img = lin("img_in", latent)
    for i in range(s.double):
        img, txt = double_block(i, img, txt, vec, rope, s, lin)
    x = torch.cat((txt, img), dim=1)
    for i in range(s.single):
        x = single_block(i, x, vec, rope, s, lin)
    v = lin("final", ln(x[:, txt.shape[1] :]))
    return v, latent + dt * v


def float_linear(weights, dtype: torch.dtype) -> Linear:
    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = weights[name]
        return F.linear(x, w.to(dtype), b.to(dtype))

    return lin


def pack_linear(weights, packed, *, full_precision: bool) -> Linear:
    """Block layers through ``layout_math.linear``; others as bf16."""

    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = weights[name]
        if name not in packed:
            return F.linear(x, w, b)
        codes, scale, fmt = packed[name]
        return layout_math.linear(x, codes, scale, fmt, b, x.dtype, full_precision=full_precision)

    return lin


def time_step(step: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def tokens_of(name: str, s: Shape) -> int:
    """Rows (M) a layer's linear sees in one step."""
    if "mod" in name:
        return 1
    if name.startswith("single_blocks."):
        return s.img_tokens + s.txt_tokens
    return s.txt_tokens if ".txt_" in name else s.img_tokens


def layer_breakdown(s: Shape, weights, packed, repeats: int, device: str) -> list[dict]:
    """Median time of each distinct block linear ``(M, N, K)`` alone: bf16, pack, dequantize."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name in packed:
        n, k = weights[name][0].shape
        groups.setdefault((tokens_of(name, s), n, k), []).append(name)
    out = []
    gen = torch.Generator(device=device).manual_seed(7)
    for (m, n, k), names in groups.items():
        w, b = weights[names[0]]
        codes, scale, fmt = packed[names[0]]
        x = torch.randn(m, k, generator=gen, device=device).bfloat16()
        row = {"m": m, "n": n, "k": k, "count": len(names), "example": names[0]}
        with torch.inference_mode():
            bf16 = functools.partial(F.linear, x, w, b)
            row["bf16_ms"] = statistics.median(time_step(bf16, repeats))
            for label, full in (("pack_ms", False), ("dequantize_ms", True)):
                pack = functools.partial(
                    layout_math.linear, x, codes, scale, fmt, b, x.dtype, full_precision=full
                )
                row[label] = statistics.median(time_step(pack, repeats))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens")
    ap.add_argument("--txt-tokens", type=int, default=512)
    ap.add_argument("--formats", default="int8_blockwise,float8_e4m3fn_blockwise")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "runtime_flux.json"))
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = Shape(hidden=args.hidden, heads=args.hidden // 128, double=args.double,
              single=args.single, img_tokens=args.tokens, txt_tokens=args.txt_tokens)  # fmt: skip
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    weights = make_weights(s, device, args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    latent = torch.randn(1, s.img_tokens, s.in_channels, generator=g, device=device)
    txt = torch.randn(1, s.txt_tokens, s.hidden, generator=g, device=device)
    vec = torch.randn(1, s.hidden, generator=g, device=device)
    rope = rope_tables(s.txt_tokens + s.img_tokens, 128, device)

    def run(lin: Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return euler_step(latent.to(dtype), txt.to(dtype), vec.to(dtype), rope, s, lin)

    ref_v, ref_x = run(float_linear(weights, torch.float32), torch.float32)
    rows = []

    def record(label: str, backend: str, lin: Linear, base_ms: float | None) -> dict:
        v, x = run(lin, torch.bfloat16)
        times = (
            time_step(lambda: run(lin, torch.bfloat16), args.repeats) if device == "cuda" else [0.0]
        )
        row = {
            "variant": label, "backend": backend, "ms_median": statistics.median(times),
            "ms_min": min(times), "ms_max": max(times), "err_v": rel(v, ref_v),
            "err_next_latent": rel(x, ref_x),
        }  # fmt: skip
        row["speedup_vs_bf16"] = base_ms / row["ms_median"] if base_ms else 1.0
        rows.append(row)
        return row

    base = record("bf16", "torch", float_linear(weights, torch.bfloat16), None)
    verdicts = {}
    layer_errs: dict[tuple[str, str], float] = {}
    breakdowns: dict[str, list[dict]] = {}

    def measure_format(name: str) -> None:
        fmt = layout_math.format_for(name, args.block)
        packed = {}
        for layer, (w, _) in weights.items():
            if quantized_layer(layer):
                codes, scale = formats.quantize(w, fmt)
                packed[layer] = (codes, scale, fmt)
        exact = pack_linear(weights, packed, full_precision=True)
        deq = record(f"{name} (dequantize)", "dequantize", exact, base["ms_median"])
        probe_layer = next(iter(packed))
        codes, scale, _ = packed[probe_layer]
        gx = torch.Generator(device=device).manual_seed(args.seed + 2)
        x = torch.randn(4608, codes.shape[1], generator=gx, device=device).bfloat16()
        backend = layout_math.linear_backend(x, codes, fmt)
        # one layer alone, against float64 of the same codes (the kernel adds only the
        # activation quantization; the dequantize path only bf16 rounding)
        want = x.double() @ formats.dequantize(codes, scale, fmt).double().T
        for full in (True, False):
            got = layout_math.linear(
                x, codes, scale, fmt, None, torch.bfloat16, full_precision=full
            )
            layer_errs[(name, "dequantize" if full else backend)] = rel(got, want)
        fast = record(name, backend, pack_linear(weights, packed, full_precision=False),
                      base["ms_median"])  # fmt: skip
        if device == "cuda":
            breakdowns[name] = layer_breakdown(s, weights, packed, args.repeats, device)
        bound = 2.0 * deq["err_v"]
        verdicts[name] = {
            "backend": backend, "speedup": fast["speedup_vs_bf16"], "err_v": fast["err_v"],
            "bound_err_v": bound, "within_bound": fast["err_v"] <= bound,
            "speedup_ok": fast["speedup_vs_bf16"] >= 1.2,
        }  # fmt: skip
        del packed

    for name in [f for f in args.formats.split(",") if f]:
        try:
            measure_format(name)
        except Exception as exc:  # report and go on with the next format
            verdicts[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}

    result = {"card": card, "shape": s.__dict__, "block": args.block, "torch": torch.__version__,
              "rows": rows, "verdicts": verdicts,
              "layer_errs": {f"{k[0]} {k[1]}": v for k, v in layer_errs.items()},
              "layers": breakdowns}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\ncard: {card}  torch {torch.__version__}  shape: {s}")
    print(f"{'variant':<38}{'backend':<12}{'ms/step':>9}{'vs bf16':>9}{'err v':>10}{'err x1':>10}")
    for r in rows:
        line = f"{r['variant']:<38}{r['backend']:<12}{r['ms_median']:9.3f}"
        print(line + f"{r['speedup_vs_bf16']:9.3f}{r['err_v']:10.5f}{r['err_next_latent']:10.6f}")
    for name, layers in breakdowns.items():
        print(f"\n{name}: each block linear alone (ms, median)  M x N x K  count  bf16  pack  deq")
        totals = [0.0, 0.0, 0.0]
        for r in layers:
            t = (r["bf16_ms"], r["pack_ms"], r["dequantize_ms"])
            totals = [a + r["count"] * b for a, b in zip(totals, t, strict=True)]
            shape = f"{r['m']}x{r['n']}x{r['k']}"
            print(f"  {shape:<18}{r['count']:>3}  {t[0]:7.3f} {t[1]:7.3f} {t[2]:7.3f}")
        print(f"  all block linears: bf16 {totals[0]:.2f} ms, pack {totals[1]:.2f} ms, "
              f"dequantize {totals[2]:.2f} ms (bf16 step {base['ms_median']:.2f} ms)")  # fmt: skip
    for (name, how), err in layer_errs.items():
        print(f"one layer {name} {how}: rel. error vs float64 {err:.2e}")
    for name, v in verdicts.items():
        if "error" in v:
            print(f"{name}: ERROR {v['error']}")
            continue
        ok = v["within_bound"] and v["speedup_ok"]
        print(
            f"{name}: {v['backend']} {v['speedup']:.3f}x bf16 (need >= 1.2), err v "
            f"{v['err_v']:.5f} (bound {v['bound_err_v']:.5f}) -> {'PASS' if ok else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
