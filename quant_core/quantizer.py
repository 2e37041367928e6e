"""One layer: round-to-nearest or learned codes, the guard, bias correction, ``input_scale``.

Both roundings use the same functions of :mod:`.formats`: the absmax scale and the codes of
round-to-nearest (through :mod:`.dispatch`, bit-identical), the grid of ``round_to_grid`` for
every value the search tries, ``dequantize`` (``codes · scale``) for both; so a learned layer
differs from round-to-nearest only in which grid value each weight takes.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import dispatch, error_feedback, formats
from .calibration import LayerStats, Moments
from .formats import FP8_E4M3_MAX, Format, Kind, Scaling
from .learned import (
    LearnedOptions,
    OutputObjective,
    learn_codes,
    matmul_precision,
    search_matmul,
    svd_objective,
)


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
    backend: str = "auto",
    hook: Callable[[float], None] | None = None,
) -> LayerResult:
    """Quantize ``weight [out, in]`` (on its device) with ``rounding`` ``nearest``/``learned``.

    ``stats`` are the layer's calibration statistics, ``bias [out]`` its bias (corrected only
    when ``options.bias_correction`` and ``stats`` are given). ``backend`` picks the error
    feedback kernel (:func:`.dispatch.choose_error_feedback`). ``hook(fraction)`` reports progress
    through a learned search (and may raise, e.g. to cancel). Raises
    :class:`~.formats.NonFiniteWeightError` for NaN/Inf weights.
    """
    options = options or LearnedOptions()
    w = weight.float()
    # the dispatcher: Triton on CUDA, formats elsewhere; bit-identical either way
    rtn_codes, scale = dispatch.quantize(w, fmt)
    rtn_hat = formats.dequantize(rtn_codes, scale, fmt)
    stats = stats.to(w.device) if stats is not None else None
    correct = options.bias_correction and bias is not None and stats is not None
    extra: dict[str, object] = {}

    w_hat, codes = rtn_hat, rtn_codes
    held = None if stats is None else (stats.check if stats.check is not None else stats.fit)
    centre = stats.fit if correct and stats is not None else None
    with matmul_precision(options.precision, w.device):
        energies = _Energies(w, rtn_hat, held, centre)
        if rounding == "learned":
            t0 = time.perf_counter()
            cand = _learned(w, scale, fmt, stats, correct, options, seed, backend, extra, hook)
            if cand is not None and _guard(w, cand, energies, stats, extra):
                w_hat, codes = cand.w_hat, cand.codes
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
        final = energies.learned if w_hat is not rtn_hat else energies.rtn
        output_sqnr = formats.sqnr_db(energies.signal, final)
        extra["rtn_output_sqnr_db"] = formats.sqnr_db(energies.signal, energies.rtn_plain)
        extra["output_sqnr_rows"] = "held-out" if stats.check is not None else "fit"
    if rounding == "learned":
        extra["rtn_weight_sqnr_db"] = _weight_sqnr(w, rtn_hat)
    return LayerResult(
        codes=codes,
        scale=scale,
        bias=new_bias,
        input_scale=input_scale,
        weight_sqnr_db=_weight_sqnr(w, w_hat),
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
    backend: str,
    extra: dict[str, object],
    hook: Callable[[float], None] | None = None,
) -> _Candidate | None:
    """Run the search; None (with the reason in ``extra``) when it cannot run."""
    s3 = scale_3d(scale, w.shape, fmt)
    w3 = w[None]
    if options.objective == "output":
        if stats is None:
            extra["learned_skipped"] = "no calibration statistics for this layer"
            return None
        fit = stats.fit
        h = (fit.covariance if correct else fit.second_moment)[None].float()
        # the search sees the damped matrix too: a small ridge toward weight error
        extra["search_matmul"] = search_matmul(options.precision, w.device)
        bf16 = extra["search_matmul"] == "bf16"
        objective = OutputObjective(error_feedback.damped(h, options.damp), bf16=bf16)
        start = None
        if options.error_feedback:
            choice = dispatch.choose_error_feedback(w.device, backend)
            extra["feedback_backend"] = choice.backend
            start = error_feedback.error_feedback(
                w3, s3, h, fmt.kind, damp=options.damp, backend=choice.backend,
                hook=_part(hook, 0.0, 0.5),
            )  # fmt: skip
    else:
        objective = svd_objective(w3, options, seed)
        start = None
    search_hook = _part(hook, 0.5, 1.0) if start is not None else hook
    result = learn_codes(w3, s3, fmt.kind, objective, options, start=start, hook=search_hook)
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
    # the search's codes are grid values (``snap`` equals formats.round_to_grid): the cast to
    # the code dtype is exact, and dequantization is the same ``codes · scale`` as for RTN
    codes = result.codes[0].to(fmt.code_dtype)
    return _Candidate(formats.dequantize(codes, scale, fmt), codes)


def _part(
    hook: Callable[[float], None] | None, lo: float, hi: float
) -> Callable[[float], None] | None:
    """``hook`` for a sub-step that covers ``[lo, hi]`` of the layer's progress."""
    if hook is None:
        return None
    return lambda fraction: hook(lo + (hi - lo) * fraction)


def _guard(
    w: torch.Tensor,
    cand: _Candidate,
    energies: _Energies,
    stats: LayerStats | None,
    extra: dict[str, object],
) -> bool:
    """Whether the learned codes beat round-to-nearest where the search did not look."""
    energies.add_learned(w - cand.w_hat)
    if stats is None:
        extra["guard_on"] = "weight error (no statistics)"
    else:
        extra["guard_on"] = "held-out rows" if stats.check is not None else "fit rows"
    margin = formats.sqnr_db(energies.rtn, energies.learned)
    extra["guard_margin_db"] = margin
    better = energies.learned < energies.rtn
    extra["kept"] = "learned" if better else "nearest"
    return better


class _Energies:
    """Output error energies on the held rows (or weight error energies without statistics).

    ``signal`` = E‖x Wᵀ‖², ``rtn_plain`` = round-to-nearest without bias correction, ``rtn`` and
    ``learned`` with the bias treatment the layer gets (``centre`` = the fit mean or None).
    One matmul with the held matrix serves all of them (float64 on the CPU).
    """

    def __init__(
        self, w: torch.Tensor, rtn_hat: torch.Tensor, held: Moments | None, centre: Moments | None
    ) -> None:
        self.held, self.centre = held, centre
        if held is None:
            self.signal = float((w.double() ** 2).sum())
            self.rtn = self.rtn_plain = float(((w - rtn_hat).double() ** 2).sum())
            self.learned = math.inf
            return
        (self.signal, _), (self.rtn_plain, self.rtn) = self._output(w, w - rtn_hat)

    def add_learned(self, e: torch.Tensor) -> None:
        if self.held is None:
            self.learned = float((e.double() ** 2).sum())
        else:
            self.learned = self._output(e)[0][1]

    def _output(self, *errors: torch.Tensor) -> list[tuple[float, float]]:
        """``(plain, bias-treated)`` energy of each ``e [out, in]`` over the held rows."""
        held = self.held
        assert held is not None
        work = torch.float64 if errors[0].device.type == "cpu" else torch.float32
        stacked = torch.stack(errors).to(work)  # [n, out, in]
        h = held.second_moment.to(work)
        plain = ((stacked @ h) * stacked).sum((-1, -2)).double()
        treated = plain
        if self.centre is not None:
            # E‖(x − c)eᵀ‖² = E‖x eᵀ‖² − 2 (e c)·(e μ) + ‖e c‖², c the fit mean
            ec = stacked @ self.centre.mean.to(work)
            em = stacked @ held.mean.to(work)
            treated = plain - (2 * (ec * em) - ec * ec).sum(-1).double()
        return [
            (max(float(p), 0.0), max(float(t), 0.0)) for p, t in zip(plain, treated, strict=True)
        ]


def scale_3d(scale: torch.Tensor, shape: tuple[int, ...], fmt: Format) -> torch.Tensor:
    """``weight_scale`` as ``[1, out|1, in|1]`` (blocks expanded to ``[1, out, in]``)."""
    if fmt.scaling is Scaling.TENSOR:
        return scale.reshape(1, 1, 1)
    if fmt.scaling is Scaling.ROW:
        return scale.reshape(1, -1, 1)
    return formats.expand_scale(scale, tuple(shape), fmt)[None].contiguous()


def _weight_sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Weight SQNR over the whole tensor (float64 sums; two host reads, whatever the size)."""
    wd = w.double()
    return formats.sqnr_db(float((wd * wd).sum()), float(((wd - w_hat.double()) ** 2).sum()))
