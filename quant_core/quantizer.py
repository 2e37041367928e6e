"""One layer: round-to-nearest or learned codes, the guard, bias correction, ``input_scale``.

Both roundings produce codes through the same functions of :mod:`.formats` (scale from the
absmax, ``round_to_grid`` of ``w / scale``, ``quantize_with_scale`` for the stored codes), so a
learned layer differs from round-to-nearest only in which grid value each weight takes.

With calibration statistics (:mod:`.calibration`):

- the **guard** compares the learned codes with round-to-nearest on the *check* rows (inputs
  the search never saw) and keeps round-to-nearest unless learned is strictly better; without
  check rows it compares on the fit rows, without statistics on the weight error (where
  round-to-nearest is optimal, so a data-free search without statistics keeps RTN);
- **bias correction** adds ``E·μ`` to the bias (``E = W − Ŵ``, ``μ`` the recorded input mean), so
  the mean output error vanishes and only ``(x − μ)·Eᵀ`` remains; the search then minimises the
  covariance objective, which is exactly that remainder;
- FP8 per-tensor layers get ``input_scale = max|x| / 448`` (ComfyUI otherwise quantizes
  activations with scale 1.0, clipping at ±448).

Output SQNR is ``10·log10(E‖x Wᵀ‖² / E‖y − ŷ‖²)`` over the check rows, the signal being the
layer's matmul output without bias.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import error_feedback, formats
from .calibration import LayerStats, Moments
from .formats import FP8_E4M3_MAX, Format, Kind, Scaling
from .learned import LearnedOptions, OutputObjective, learn_codes, svd_objective


@dataclass
class LayerResult:
    """What one layer writes and what it measured.

    ``codes [out, in]`` (code dtype), ``scale`` (F32, ``fmt.scale_shape``), ``bias`` (F32
    ``[out]``, only when corrected), ``input_scale`` (F32 ``[]``, FP8 with statistics).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor | None
    weight_sqnr_db: float
    output_sqnr_db: float | None
    extra: dict[str, object] = field(default_factory=dict)


def quantize_layer(
    weight: torch.Tensor,
    fmt: Format,
    *,
    rounding: str,
    stats: LayerStats | None = None,
    bias: torch.Tensor | None = None,
    options: LearnedOptions | None = None,
    seed: int = 0,
    use_triton: bool = False,
) -> LayerResult:
    """Quantize ``weight [out, in]`` (on its device) with ``rounding`` ``nearest``/``learned``.

    ``stats`` are the layer's calibration statistics, ``bias [out]`` its bias (corrected only
    when ``options.bias_correction`` and ``stats`` are given). Raises
    :class:`~.formats.NonFiniteWeightError` for NaN/Inf weights.
    """
    options = options or LearnedOptions()
    w = weight.float()
    scale = formats.compute_scale(w, fmt)
    rtn_codes = formats.quantize_with_scale(w, scale, fmt)
    rtn_hat = formats.dequantize(rtn_codes, scale, fmt)
    stats = stats.to(w.device) if stats is not None else None
    correct = options.bias_correction and bias is not None and stats is not None
    extra: dict[str, object] = {}

    w_hat, codes = rtn_hat, rtn_codes
    if rounding == "learned":
        t0 = time.perf_counter()
        candidate = _learned(w, scale, fmt, stats, correct, options, seed, use_triton, extra)
        if candidate is not None:
            w_hat, codes = _guard(w, rtn_hat, rtn_codes, candidate, scale, fmt, stats, correct,
                                  extra)  # fmt: skip
        extra["learned_time_s"] = time.perf_counter() - t0

    new_bias = None
    if correct:
        assert stats is not None and bias is not None
        new_bias = bias.float() + (w - w_hat) @ stats.fit.mean
        extra["bias_corrected"] = True
    input_scale = None
    fp8_tensor = fmt.kind is Kind.FP8 and fmt.scaling is Scaling.TENSOR
    if stats is not None and options.input_scale and fp8_tensor:
        amax = float(stats.absmax)
        input_scale = torch.tensor(amax / FP8_E4M3_MAX if amax > 0 else 1.0)
        extra["input_scale"] = float(input_scale)

    output_sqnr = None
    if stats is not None:
        held = stats.check if stats.check is not None else stats.fit
        output_sqnr = _output_sqnr(w, w_hat, held, stats.fit if correct else None)
        extra["rtn_output_sqnr_db"] = _output_sqnr(w, rtn_hat, held, None)
        extra["output_sqnr_rows"] = "held-out" if stats.check is not None else "fit"
    return LayerResult(
        codes=codes,
        scale=scale,
        bias=new_bias,
        input_scale=input_scale,
        weight_sqnr_db=formats.error_energy(w, codes, scale, fmt).sqnr_db,
        output_sqnr_db=output_sqnr,
        extra=extra,
    )


@dataclass
class _Candidate:
    w_hat: torch.Tensor
    codes: torch.Tensor


def _learned(
    w: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format,
    stats: LayerStats | None,
    correct: bool,
    options: LearnedOptions,
    seed: int,
    use_triton: bool,
    extra: dict[str, object],
) -> _Candidate | None:
    """Run the search; None (with the reason in ``extra``) when it cannot run."""
    s3 = _scale3(scale, w.shape, fmt)
    w3 = w[None]
    if options.objective == "output":
        if stats is None:
            extra["learned_skipped"] = "no calibration statistics for this layer"
            return None
        fit = stats.fit
        h = (fit.covariance if correct else fit.second_moment)[None].float()
        # the search sees the damped matrix too: a small ridge toward weight error
        objective = OutputObjective(
            error_feedback.damped(h, float(__import__("os").environ.get("ODAMP", options.damp)))
        )
        start = None
        if options.error_feedback:
            start = error_feedback.error_feedback(
                w3, s3, h, fmt.kind, damp=options.damp, use_triton=use_triton
            )
    else:
        objective = svd_objective(w3, options, seed)
        start = None
    result = learn_codes(w3, s3, fmt.kind, objective, options, start=start)
    extra.update(
        objective=options.objective,
        optimizer=options.optimizer,
        schedule=options.schedule,
        iterations=result.iterations,
        stop_reason=result.stop_reason,
        fit_loss_rtn=float(result.rtn_loss[0]),
        fit_loss_start=float(result.start_loss[0]),
        fit_loss=float(result.loss[0]),
    )
    w_hat = (result.codes[0] * s3[0]).float()
    # encode through the same function as round-to-nearest: the codes are already on the grid
    codes = formats.quantize_with_scale(w_hat, scale, fmt)
    return _Candidate(formats.dequantize(codes, scale, fmt), codes)


def _guard(
    w: torch.Tensor,
    rtn_hat: torch.Tensor,
    rtn_codes: torch.Tensor,
    cand: _Candidate,
    scale: torch.Tensor,
    fmt: Format,
    stats: LayerStats | None,
    correct: bool,
    extra: dict[str, object],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the learned codes only if they beat round-to-nearest where the search did not look."""
    if stats is None:
        rtn_err = float(((w - rtn_hat) ** 2).sum())
        new_err = float(((w - cand.w_hat) ** 2).sum())
        extra["guard_on"] = "weight error (no statistics)"
    else:
        held = stats.check if stats.check is not None else stats.fit
        centre = stats.fit if correct else None
        rtn_err = _error_energy(w - rtn_hat, held, centre)
        new_err = _error_energy(w - cand.w_hat, held, centre)
        extra["guard_on"] = "held-out rows" if stats.check is not None else "fit rows"
    margin = _db(rtn_err, new_err)
    extra["guard_margin_db"] = margin
    if new_err < rtn_err:
        extra["kept"] = "learned"
        return cand.w_hat, cand.codes
    extra["kept"] = "nearest"
    return rtn_hat, rtn_codes


def _scale3(scale: torch.Tensor, shape: torch.Size, fmt: Format) -> torch.Tensor:
    """Scale as ``[1, out|1, in|1]`` (blocks expanded to ``[1, out, in]``)."""
    if fmt.scaling is Scaling.TENSOR:
        return scale.reshape(1, 1, 1)
    if fmt.scaling is Scaling.ROW:
        return scale.reshape(1, -1, 1)
    return formats.expand_scale(scale, tuple(shape), fmt)[None].contiguous()


def _error_energy(e: torch.Tensor, held: Moments, centre: Moments | None) -> float:
    """``E‖(x − c) eᵀ‖²`` over ``held`` rows, ``c`` the fit mean (bias-corrected) or 0."""
    ed = e.double()
    h = held.second_moment.double()
    energy = (ed @ h * ed).sum()
    if centre is not None:
        # E‖(x−c)eᵀ‖² = E‖x eᵀ‖² − 2 (e c)·(e μ) + ‖e c‖²
        ec = ed @ centre.mean.double()
        em = ed @ held.mean.double()
        energy = energy - 2 * (ec * em).sum() + (ec * ec).sum()
    return max(float(energy), 0.0)


def _output_sqnr(
    w: torch.Tensor, w_hat: torch.Tensor, held: Moments, centre: Moments | None
) -> float:
    signal = _error_energy(w, held, None)
    return formats.sqnr_db(signal, _error_energy(w - w_hat, held, centre))


def _db(reference: float, value: float) -> float:
    if value <= 0:
        return math.inf
    if reference <= 0:
        return -math.inf
    return 10.0 * math.log10(reference / value)
