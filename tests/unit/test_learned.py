"""Learned rounding on CPU: optimum vs RTN, schedules, early stopping, seeds, guard, bias."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from comfyui_quantizer.quant_core import error_feedback, formats
from comfyui_quantizer.quant_core.calibration import LayerStats, Moments
from comfyui_quantizer.quant_core.config import QuantConfig
from comfyui_quantizer.quant_core.errors import ConfigError
from comfyui_quantizer.quant_core.formats import Format, Kind, Scaling
from comfyui_quantizer.quant_core.learned import (
    LearnedOptions,
    OutputObjective,
    adam_update,
    learn_codes,
    svd_objective,
)
from comfyui_quantizer.quant_core.quantizer import quantize_layer, scale_3d

INT8_ROW = Format(Kind.INT8, Scaling.ROW)
FP8 = Format(Kind.FP8, Scaling.TENSOR)


def _correlated(n: int, features: int, seed: int, *, rho: float = 0.9, offset: float = 0.0):
    """Rows with strongly correlated neighbouring features and per-feature loudness."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, features + 1, generator=g, dtype=torch.float64)
    x = math.sqrt(rho) * z[:, :1] + math.sqrt(1 - rho) * z[:, 1:]
    x = x * torch.linspace(0.5, 2.0, features, dtype=torch.float64) + offset
    return x


def _moments(x: torch.Tensor) -> Moments:
    h = (x.T @ x / x.shape[0]).float()
    return Moments(h, x.mean(0).float(), x.abs().max().float(), x.shape[0])


def _stats(x_fit: torch.Tensor, x_check: torch.Tensor | None = None) -> LayerStats:
    return LayerStats(_moments(x_fit), None if x_check is None else _moments(x_check))


def _weight(rows: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, features, generator=g) * 0.05


def _loss64(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ``e H eᵀ`` in float64."""
    e = (w - w_hat).double()
    return ((e @ h.double()) * e).sum(-1)


# ------------------------------------------------------------------------------------------
# the objective and the search


def test_two_correlated_inputs_the_optimum_is_not_round_to_nearest() -> None:
    # w/s = (0.4, 0.4) per row, inputs with correlation 0.95: RTN gives codes (0, 0) and
    # error energy 0.16·(2 + 2·0.95) = 0.624 s²; codes (1, 0) or (0, 1) give 0.064 s².
    s = 0.01
    w = torch.tensor([[127 * s, 0.4 * s, 0.4 * s, 0.0]])  # first weight fixes the row scale
    h = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.95, 0.0], [0.0, 0.95, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    moments = Moments(h, torch.zeros(4), torch.tensor(1.0), 1000)
    stats = LayerStats(moments, moments)
    opts = LearnedOptions(damp=0.0)
    res = quantize_layer(w, INT8_ROW, rounding="learned", stats=stats, options=opts)
    codes = res.codes.float()[0, 1:3].tolist()
    assert codes in ([1.0, 0.0], [0.0, 1.0])
    rtn = quantize_layer(w, INT8_ROW, rounding="nearest")
    assert rtn.codes.float()[0, 1:3].tolist() == [0.0, 0.0]
    assert res.extra["kept"] == "learned"
    assert res.extra["guard_margin_db"] == pytest.approx(10 * math.log10(0.624 / 0.064), abs=0.05)


@pytest.mark.parametrize("fmt", [INT8_ROW, FP8], ids=["int8-row", "fp8"])
def test_search_reaches_the_brute_force_optimum_on_a_small_anisotropic_layer(fmt: Format) -> None:
    rows, features = 6, 6
    w = _weight(rows, features, 1)
    x = _correlated(4000, features, 2, rho=0.9)
    stats = _stats(x, x)
    opts = LearnedOptions(damp=0.0, num_iter=64, early_stop=16)
    res = quantize_layer(w, fmt, rounding="learned", stats=stats, options=opts)
    scale = formats.compute_scale(w, fmt)
    s = formats.expand_scale(scale, tuple(w.shape), fmt).expand_as(w)
    h = stats.fit.second_moment
    # brute force per row: every code within one grid step of round-to-nearest
    rtn_codes = formats.round_to_grid(w / s, fmt.kind)
    best = []
    for r in range(rows):
        options = [_neighbours(float(c), fmt.kind) for c in rtn_codes[r]]
        cand = torch.tensor(list(itertools.product(*options)), dtype=torch.float32)
        losses = _loss64(w[r].expand_as(cand), cand * s[r], h)
        best.append(losses.min())
    optimum = torch.stack(best)
    learned = _loss64(w, formats.dequantize(res.codes, res.scale, fmt), h)
    nearest = _loss64(w, rtn_codes * s, h)
    assert (optimum < nearest * 0.999).sum() >= rows // 2  # the optimum is not RTN here
    assert learned.sum() < 0.7 * nearest.sum()
    # coordinate descent is a local search: the exact optimum on most rows, close on the rest
    assert (learned <= optimum * (1 + 1e-6)).sum() >= rows * 2 // 3
    assert learned.sum() <= optimum.sum() * 1.1


def _neighbours(code: float, kind: Kind) -> list[float]:
    if kind is Kind.INT8:
        return [c for c in (code - 1, code, code + 1) if abs(c) <= 127]
    grid = formats.round_to_grid(torch.tensor([code * (1 - 2**-4), code, code * (1 + 2**-4)]), kind)
    values = sorted(set(grid.tolist()) | {code})
    i = values.index(code)
    return values[max(0, i - 1) : i + 2]


def test_error_feedback_error_is_the_weighted_sum_of_rounding_residuals() -> None:
    # GPTQ/LDLQ identity: with H = (I + Ū) D (I + Ū)ᵀ, loss = Σ_k D_k ‖r_k‖² (float64 check)
    w = _weight(16, 12, 3)[None]
    x = _correlated(500, 12, 4)
    h = (x.T @ x / x.shape[0]).float()[None]
    s = w.abs().amax(-1, keepdim=True) / 127
    codes, pre = error_feedback.error_feedback(w, s, h, Kind.INT8, damp=0.01, block=5)
    order = error_feedback.act_order(h)[0]
    hd = error_feedback.damped(h.double(), 0.01)[0][order][:, order]
    # D from a float64 UDUᵀ factorization computed here: reverse, Cholesky, reverse back
    c = torch.linalg.cholesky(hd.flip(0, 1))
    d = torch.diagonal(c).flip(0) ** 2
    r = ((pre - codes) * s)[0][:, order].double()
    e = (w - codes * s)[0].double()
    loss = ((e @ error_feedback.damped(h.double(), 0.01)[0]) * e).sum()
    assert float(loss) == pytest.approx(float((r**2 * d).sum()), rel=1e-4)
    rtn = ((w - formats.round_to_grid(w / s, Kind.INT8) * s)[0]).double()
    assert loss < 0.6 * ((rtn @ error_feedback.damped(h.double(), 0.01)[0]) * rtn).sum()


def test_reported_loss_is_the_loss_of_the_saved_codes() -> None:
    w = _weight(24, 16, 5)
    x = _correlated(800, 16, 6)
    stats = _stats(x, _correlated(400, 16, 7))
    opts = LearnedOptions(bias_correction=False)
    res = quantize_layer(w, FP8, rounding="learned", stats=stats, options=opts)
    assert res.extra["kept"] == "learned"
    hd = error_feedback.damped(stats.fit.second_moment[None], opts.damp)[0]
    saved = formats.dequantize(res.codes, res.scale, FP8)
    assert res.extra["fit_loss"] == pytest.approx(float(_loss64(w, saved, hd).sum()), rel=1e-5)
    assert res.extra["fit_loss"] < res.extra["fit_loss_start"] <= res.extra["fit_loss_rtn"]


# ------------------------------------------------------------------------------------------
# schedules and early stopping


def _search(options: LearnedOptions, *, start: bool = True, seed: int = 8):
    w = _weight(32, 24, seed)[None]
    x = _correlated(600, 24, seed + 1)
    h = error_feedback.damped((x.T @ x / x.shape[0]).float()[None], options.damp)
    s = scale_3d(formats.compute_scale(w[0], FP8), (32, 24), FP8)
    begin = error_feedback.error_feedback(w, s, h, Kind.FP8) if start else None
    return learn_codes(w, s, Kind.FP8, OutputObjective(h), options, start=begin)


def test_exponential_schedule_trajectory() -> None:
    opts = LearnedOptions(schedule="exponential", lr=0.05, lr_gamma=0.8, lr_min=0.01,
                          num_iter=12, early_stop=100)  # fmt: skip
    res = _search(opts)
    assert res.iterations == 12
    expect = [max(0.05 * 0.8**t, 0.01) for t in range(12)]
    assert res.lr_history == pytest.approx(expect, rel=1e-12)


def test_plateau_schedule_matches_pytorch_reduce_lr_on_plateau() -> None:
    opts = LearnedOptions(schedule="plateau", lr=0.08, lr_patience=1, lr_factor=0.5,
                          lr_cooldown=1, lr_min=0.004, lr_threshold=1e-3, num_iter=30,
                          early_stop=100)  # fmt: skip
    res = _search(opts, start=False)
    param = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=opts.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        sgd, mode="min", factor=0.5, patience=1, threshold=1e-3, threshold_mode="rel",
        cooldown=1, min_lr=0.004,
    )  # fmt: skip
    sched.best = res.loss_history[0]
    expect = []
    for loss in res.loss_history[1:]:
        expect.append(sgd.param_groups[0]["lr"])
        sched.step(loss)
    assert res.lr_history == pytest.approx(expect, rel=1e-12)
    assert len(set(expect)) >= 3  # the trajectory really decayed, more than once


def test_adaptive_schedule_boosts_after_improvement_and_decays_otherwise() -> None:
    opts = LearnedOptions(schedule="adaptive", lr=0.02, lr_factor=0.7, lr_min=0.005,
                          lr_threshold=1e-3, num_iter=30, early_stop=100)  # fmt: skip
    res = _search(opts, start=False)
    lr, best = opts.lr, res.loss_history[0]
    expect, moves = [], set()
    for loss in res.loss_history[1:]:
        expect.append(lr)
        improved = loss < best * (1 - opts.lr_threshold)
        best = loss if improved else best
        lr = min(lr * 1.25, 1.0) if improved else max(lr * opts.lr_factor, opts.lr_min)
        moves.add(improved)
    assert res.lr_history == pytest.approx(expect, rel=1e-9)
    assert moves == {True, False}


def test_early_stopping_when_round_to_nearest_is_already_optimal() -> None:
    # a diagonal H makes every weight its own problem: round-to-nearest is the optimum
    w = _weight(8, 10, 9)[None]
    h = torch.diag(torch.linspace(0.5, 3.0, 10))[None]
    s = w.abs().amax(-1, keepdim=True) / 127
    results = []
    for check_every in (1, 3, 8):
        opts = LearnedOptions(num_iter=40, early_stop=5, check_every=check_every)
        start = error_feedback.error_feedback(w, s, h, Kind.INT8)
        results.append(learn_codes(w, s, Kind.INT8, OutputObjective(h), opts, start=start))
    for res in results:
        assert res.iterations == 5
        assert res.stop_reason == "no improvement in 5 steps"
        assert torch.equal(res.codes, formats.round_to_grid(w / s, Kind.INT8))
        assert res.lr_history == results[0].lr_history


def test_early_stopping_counts_from_the_last_improvement() -> None:
    opts = LearnedOptions(num_iter=200, early_stop=6, lr_threshold=1e-3, check_every=4)
    res = _search(opts, start=False)
    hist = res.loss_history
    best, last = hist[0], 0
    for t, loss in enumerate(hist[1:], start=1):
        if loss < best * (1 - opts.lr_threshold):
            best, last = loss, t
    assert last > 0
    assert res.iterations == last + opts.early_stop < opts.num_iter


# ------------------------------------------------------------------------------------------
# optimizers and seeds


@pytest.mark.parametrize("rectified", [False, True], ids=["adamw", "radam"])
def test_adam_update_matches_torch_optim(rectified: bool) -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, generator=g))
    opt = (
        torch.optim.RAdam([p], lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
        if rectified
        else torch.optim.AdamW([p], lr=0.01, weight_decay=0.1)
    )
    value, m, v = p.detach().clone(), torch.zeros(40), torch.zeros(40)
    for step in range(1, 10):  # RAdam switches from momentum to rectified Adam at step 6
        grad = torch.randn(40, generator=g)
        p.grad = grad.clone()
        opt.step()
        value, m, v = adam_update(value, m, v, grad, lr=torch.tensor(0.01), step=step,
                                  rectified=rectified, weight_decay=0.1)  # fmt: skip
    assert torch.allclose(value, p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adamw", "radam"])
def test_gradient_optimizers_never_end_worse_than_their_start(optimizer: str) -> None:
    opts = LearnedOptions(optimizer=optimizer, lr=0.05, num_iter=30)
    res = _search(opts, start=False)
    assert float(res.loss[0]) <= float(res.start_loss[0]) == pytest.approx(float(res.rtn_loss[0]))


def test_same_seed_same_codes() -> None:
    w = _weight(64, 96, 10)
    opts = LearnedOptions(objective="svd", top_p=0.01, min_k=2, max_k=4, num_iter=10)
    s = scale_3d(formats.compute_scale(w, FP8), (64, 96), FP8)

    def run(seed: int, optimizer: str = "original") -> torch.Tensor:
        o = replace(opts, optimizer=optimizer)
        obj = svd_objective(w[None], o, seed)  # k = 4: the randomized SVD path
        return learn_codes(w[None], s, Kind.FP8, obj, o).codes

    assert torch.equal(run(3), run(3))
    assert torch.equal(run(3, "adamw"), run(3, "adamw"))
    x = _correlated(300, 96, 11)
    stats = _stats(x, x)
    a = quantize_layer(w, INT8_ROW, rounding="learned", stats=stats, seed=1)
    b = quantize_layer(w, INT8_ROW, rounding="learned", stats=stats, seed=1)
    assert torch.equal(a.codes, b.codes)


# ------------------------------------------------------------------------------------------
# guard, bias correction, input scale


def test_guard_keeps_round_to_nearest_when_held_out_rows_disagree() -> None:
    w = _weight(20, 12, 12)
    fit = _correlated(2000, 12, 13, rho=0.95)
    other = _correlated(2000, 12, 14, rho=0.95) * torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)
    opts = LearnedOptions(bias_correction=False)
    rtn = quantize_layer(w, INT8_ROW, rounding="nearest")
    bad = quantize_layer(w, INT8_ROW, rounding="learned", stats=_stats(fit, other), options=opts)
    assert bad.extra["kept"] == "nearest" and bad.extra["guard_margin_db"] < 0
    assert bad.extra["guard_on"] == "held-out rows"
    assert torch.equal(bad.codes, rtn.codes)
    assert bad.extra["fit_loss"] < bad.extra["fit_loss_rtn"]  # it did win where it looked
    good = quantize_layer(w, INT8_ROW, rounding="learned", stats=_stats(fit, fit), options=opts)
    assert good.extra["kept"] == "learned" and good.extra["guard_margin_db"] > 1.0


@pytest.mark.parametrize(
    ("precision", "device", "want"),
    [
        ("bf16", "cpu", "float32"),
        ("tf32", "cpu", "float32"),
        pytest.param("bf16", "cuda", "bf16", marks=pytest.mark.gpu),
        pytest.param("tf32", "cuda", "tf32", marks=pytest.mark.gpu),
        pytest.param("highest", "cuda", "float32", marks=pytest.mark.gpu),
    ],
)
def test_search_precision_is_what_the_report_says(precision: str, device: str, want: str) -> None:
    """The learned search runs its matmuls as asked (bf16 and TF32 on CUDA only) and the
    layer report says which; the reported loss is float32 either way, so the guard holds."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    w = _weight(24, 96, 21).to(device)
    x = _correlated(600, 96, 22)
    opts = LearnedOptions(precision=precision, num_iter=40)
    rtn = quantize_layer(w, INT8_ROW, rounding="nearest", stats=_stats(x, x).to(device))
    res = quantize_layer(
        w, INT8_ROW, rounding="learned", stats=_stats(x, x).to(device), options=opts
    )
    assert res.extra["search_matmul"] == want
    assert res.output_sqnr_db >= rtn.output_sqnr_db


def test_data_free_search_without_statistics_keeps_round_to_nearest() -> None:
    w = _weight(32, 48, 15)
    opts = LearnedOptions(objective="svd", min_k=4, num_iter=10)
    res = quantize_layer(w, FP8, rounding="learned", options=opts)
    assert res.extra["guard_on"] == "weight error (no statistics)"
    assert res.extra["kept"] == "nearest"
    assert torch.equal(res.codes, quantize_layer(w, FP8, rounding="nearest").codes)


@pytest.mark.parametrize("rounding", ["nearest", "learned"])
def test_bias_correction_cancels_the_mean_output_error(rounding: str) -> None:
    w = _weight(16, 12, 16)
    bias = torch.linspace(-0.1, 0.1, 16)
    x = _correlated(3000, 12, 17, offset=1.5)  # inputs with a large mean
    stats = _stats(x[:2000], x[2000:])
    res = quantize_layer(w, FP8, rounding=rounding, stats=stats, bias=bias)
    assert res.bias is not None and res.extra["bias_corrected"]
    w_hat = formats.dequantize(res.codes, res.scale, FP8).double()
    mu = stats.fit.mean.double()
    expect = bias.double() + (w.double() - w_hat) @ mu  # b' = b + (W − Ŵ) μ
    assert torch.allclose(res.bias.double(), expect, atol=1e-6)
    shift = (w.double() - w_hat) @ mu
    assert shift.abs().max() > 1e-4  # the correction is not trivially zero here
    # mean output over the fit rows: quantized layer + corrected bias == original layer
    y = mu @ w.double().T + bias.double()
    y_hat = mu @ w_hat.T + res.bias.double()
    assert (y_hat - y).abs().max() < 1e-5 * shift.abs().max() + 1e-7
    # on held-out rows the error energy drops (a flipped sign would double the mean error)
    xh = x[2000:]
    plain = xh @ (w.double() - w_hat).T
    corrected = plain - shift
    assert (corrected**2).mean() < (plain**2).mean()


def test_input_scale_is_the_input_absmax_over_448_for_fp8_only() -> None:
    w = _weight(16, 12, 18)
    x = _correlated(500, 12, 19)
    stats = _stats(x[:300], x[300:])
    fp8 = quantize_layer(w, FP8, rounding="nearest", stats=stats)
    assert fp8.input_scale is not None
    assert float(fp8.input_scale) == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    assert quantize_layer(w, INT8_ROW, rounding="nearest", stats=stats).input_scale is None


# ------------------------------------------------------------------------------------------
# options


def test_options_are_validated_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"learned\.optimizer"):
        LearnedOptions(optimizer="sgd")
    with pytest.raises(ConfigError, match=r"learned\.lr_gamma"):
        LearnedOptions(lr_gamma=1.5)
    with pytest.raises(ConfigError, match=r"learned\.num_iter"):
        LearnedOptions(num_iter=-1)
    with pytest.raises(ConfigError, match="needs calibration"):
        QuantConfig(rounding="learned")
    QuantConfig(rounding="learned", learned=LearnedOptions(objective="svd"))
    QuantConfig(rounding="learned", calibration="cal.safetensors")


@pytest.mark.parametrize("kind", [Kind.INT8, Kind.FP8])
def test_search_rounding_equals_the_formats_grid_function(kind: Kind) -> None:
    from comfyui_quantizer.quant_core.learned import snap

    grid = torch.unique(formats.round_to_grid(torch.linspace(-460, 460, 400001), kind))
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints: round half to even decides
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(100000, generator=g) * 100, torch.randn(10000, generator=g) * 1e-3]
    x = torch.cat([grid, ties, *noise, torch.tensor([1e4, -1e4, 0.0])])
    assert torch.equal(snap(x, kind), formats.round_to_grid(x, kind))
