"""Learned rounding: choose each layer's codes to minimise an objective, not the weight error.

Round-to-nearest already minimises the weight error ``‖W − Ŵ‖²`` for a fixed scale; what a
model feels is the *output* error. Two objectives over the weight error ``E = W − codes·scale``:

- ``output``: ``Σ_rows e H eᵀ = n⁻¹ ‖X Eᵀ‖²`` with ``H`` the second moment of the layer's
  recorded inputs (or their covariance when the bias absorbs the mean error, see quantizer).
  Rows are independent problems, so every row keeps its own best codes.
- ``svd``: the reference tool's data-free proxy ``‖U_kᵀ E V_k‖²`` on the top-``k`` singular
  subspaces of ``W`` (``k = clamp(top_p · min(out, in), min_k, max_k)``). It is a *proxy*: it
  knows nothing of the inputs, and on real activations it does not beat round-to-nearest.

The search (``learn_codes``) starts from round-to-nearest, or for ``output`` from GPTQ-style
error feedback (:mod:`.error_feedback`), then runs ``num_iter`` refinement steps. Each step an
optimiser proposes new codes, the objective scores them exactly, and each row (each layer, for
``svd``) keeps the best codes seen; the loss reported is the loss of those codes. Optimisers:

- ``original``: coordinate descent on the codes. For every weight the exact best grid value
  given the others is ``round((ŵ + g/c) / s)`` (``g`` the objective's gradient, ``c`` its
  curvature); each row moves the ``⌈lr · in⌉`` weights with the largest predicted gain, and a
  row keeps the move only if its exact loss went down. ``lr`` is a fraction of a row.
- ``adamw`` / ``radam``: a continuous value per weight (scaled units, started at the pre-
  rounding value), moved by AdamW / RAdam on the straight-through gradient; codes are its
  rounding. ``lr`` is in code steps. (Weight decay would pull codes to zero; it defaults to 0.)

Learning-rate schedules (the LR and every counter live on the device: no host sync per step):
``exponential`` (``lr·gamma^t``), ``plateau`` (PyTorch's ReduceLROnPlateau rule: ``patience``,
``factor``, ``cooldown``, ``min``, relative ``threshold``), ``adaptive`` (×1.25 after an improving
step, ×``factor`` after a non-improving one, within ``[lr_min, 1]``). A step "improves" when the
best total loss drops by more than ``lr_threshold`` (relative). Early stopping ends the search
``early_stop`` steps after the last improvement; the host looks every ``check_every`` steps and
the steps in between are no-ops, so results do not depend on ``check_every``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .formats import FP8_E4M3_MAX, Kind, round_to_grid, round_to_int8_grid

OBJECTIVES = ("output", "svd")
OPTIMIZERS = ("original", "adamw", "radam")
SCHEDULES = ("adaptive", "exponential", "plateau")
PRECISIONS = ("highest", "tf32", "bf16")
_ADAPTIVE_BOOST = 1.25
_ADAPTIVE_MAX = 1.0
# Coordinate descent moves at most this fraction of a row per step: beyond it the moves
# interact so much that rows reject them (measured on MiniLM: 1 % to 4 % of a row end equal),
# and the per-step top-k selection costs more the larger it may be.
_CD_MAX_FRACTION = 1 / 32


@dataclass(frozen=True, kw_only=True)
class LearnedOptions:
    """Every knob of learned rounding (defaults measured on MiniLM, see bench/)."""

    objective: str = "output"
    error_feedback: bool = True
    damp: float = 0.01
    optimizer: str = "original"
    lr: float = 0.01
    num_iter: int = 32
    schedule: str = "adaptive"
    lr_gamma: float = 0.95
    lr_patience: int = 2
    lr_factor: float = 0.5
    lr_cooldown: int = 0
    lr_min: float = 1e-4
    lr_threshold: float = 1e-4
    early_stop: int = 8
    check_every: int = 8
    weight_decay: float = 0.0
    top_p: float = 0.2
    min_k: int = 128
    max_k: int = 1280
    bias_correction: bool = True
    input_scale: bool = True
    precision: str = "tf32"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("objective", OBJECTIVES),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"learned.{name}: unknown value {getattr(self, name)!r}; use one of {allowed}"
                )
        positive = ("lr", "lr_gamma", "lr_factor", "lr_min", "top_p")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"learned.{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_gamma", "lr_factor", "top_p"):
            if getattr(self, name) > 1:
                raise ConfigError(f"learned.{name} must be at most 1, got {getattr(self, name)}")
        counts = ("num_iter", "lr_patience", "lr_cooldown", "early_stop", "min_k", "max_k")
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"learned.{name} must be a non-negative integer, got {value!r}")
        if self.check_every < 1 or self.early_stop < 1:
            raise ConfigError("learned.check_every and learned.early_stop must be at least 1")
        if self.min_k > self.max_k or self.max_k < 1:
            raise ConfigError(f"learned.min_k ({self.min_k}) must not exceed max_k ({self.max_k})")
        if not 0 <= self.damp <= 1 or self.lr_threshold < 0 or self.weight_decay < 0:
            raise ConfigError("learned.damp must be in [0, 1]; lr_threshold, weight_decay >= 0")


def search_matmul(precision: str, device: torch.device) -> str:
    """What the search's matmuls run as on ``device``: ``bf16`` (the gradient on bfloat16
    copies), ``tf32`` or ``float32``; bf16 and TF32 are CUDA-only (``matmul_precision``)."""
    if device.type != "cuda" or precision == "highest":
        return "float32"
    return "bf16" if precision == "bf16" else "tf32"


@contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Let float32 matmuls on a CUDA ``device`` use TF32 tensor cores (``tf32``, ``bf16``).

    The search and the evaluation are sums of many products whose rounding errors average
    out; bench/learned_rounding.py checks that the loss and the guard's decisions do not move.
    On the CPU (and with ``highest``) float32 stays float32. The previous setting is restored.
    """
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision != "highest"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def snap(x: torch.Tensor, kind: Kind) -> torch.Tensor:
    """:func:`.formats.round_to_grid` in fewer passes, for the search's inner loop.

    FP8: saturate, then PyTorch's E4M3 cast (round half to even, the function
    ``round_to_fp8_e4m3_grid`` is specified to equal) and back; 3 memory passes instead of 9.
    Equality with ``round_to_grid`` is a unit test. The saved codes still come from
    :func:`.formats.quantize_with_scale`.
    """
    if kind is Kind.FP8:
        return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return round_to_int8_grid(x)


class Objective:
    """A quadratic objective of the weight error: value per group, gradient, curvature."""

    #: rows are independent (``output``) or the whole layer is one group (``svd``)
    per_row: bool

    def gradient(self, e: torch.Tensor) -> torch.Tensor:
        """Half the gradient of the loss at ``e [L, out, in]`` (same shape)."""
        raise NotImplementedError

    def group_loss(self, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Loss per group from ``e`` and its ``gradient``: ``[L, out]`` or ``[L, 1]``."""
        raise NotImplementedError

    def curvature(self) -> torch.Tensor:
        """Diagonal of the Hessian (halved), broadcastable to ``[L, out, in]``."""
        raise NotImplementedError

    def exact_loss(self, e: torch.Tensor) -> torch.Tensor:
        """Loss per layer ``[L]`` at full float32 precision (what is reported)."""
        return self.group_loss(e, self.gradient(e)).sum(-1)


class OutputObjective(Objective):
    """``Σ_rows e H eᵀ`` for ``h [L, in, in]`` (the damped second moment or covariance).

    With ``bf16`` the gradient's matmul runs on bfloat16 copies (CUDA only): it proposes
    moves and scores them; the loss of the final codes is always recomputed in float32.
    """

    per_row = True

    def __init__(self, h: torch.Tensor, *, bf16: bool = False) -> None:
        self.h = h
        self.h_low = h.bfloat16() if bf16 else None

    def gradient(self, e: torch.Tensor) -> torch.Tensor:
        if self.h_low is not None:
            return (e.bfloat16() @ self.h_low).float()
        return e @ self.h

    def group_loss(self, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(e, g)

    def exact_loss(self, e: torch.Tensor) -> torch.Tensor:
        return self.group_loss(e, e @ self.h).sum(-1)

    def curvature(self) -> torch.Tensor:
        return torch.diagonal(self.h, dim1=-2, dim2=-1)[:, None, :].clamp_min(1e-30)


class SvdObjective(Objective):
    """``‖U_kᵀ E V_k‖²`` on the top-k singular vectors ``u [L, out, k]``, ``v [L, in, k]``."""

    per_row = False

    def __init__(self, u: torch.Tensor, v: torch.Tensor) -> None:
        self.u = u
        self.v = v

    def gradient(self, e: torch.Tensor) -> torch.Tensor:
        core = self.u.transpose(-1, -2) @ e @ self.v
        return self.u @ core @ self.v.transpose(-1, -2)

    def group_loss(self, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # e·(U Uᵀ E V Vᵀ) summed = ‖Uᵀ E V‖² (both projectors are idempotent)
        return (e * g).sum((-1, -2))[:, None]

    def curvature(self) -> torch.Tensor:
        rows = (self.u * self.u).sum(-1)[:, :, None]
        cols = (self.v * self.v).sum(-1)[:, None, :]
        return (rows * cols).clamp_min(1e-30)


def svd_rank(shape: tuple[int, int], options: LearnedOptions) -> int:
    """``k = clamp(floor(top_p · min(out, in)), min_k, max_k)``, at most ``min(out, in)``."""
    full = min(shape)
    return min(full, options.max_k, max(options.min_k, math.floor(options.top_p * full)))


def svd_objective(w: torch.Tensor, options: LearnedOptions, seed: int) -> SvdObjective:
    """The data-free proxy for ``w [L, out, in]`` (randomised SVD when ``k`` is small)."""
    k = svd_rank(tuple(w.shape[-2:]), options)
    if 4 * (k + 10) < min(w.shape[-2:]):
        # torch.svd_lowrank draws from the global generator: fork it so the seed decides
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, _, v = torch.svd_lowrank(w.float(), q=k + 10, niter=4)
    else:
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
        v = vh.transpose(-1, -2)
    return SvdObjective(u[..., :k].float().contiguous(), v[..., :k].float().contiguous())


@dataclass
class SearchResult:
    """Outcome of :func:`learn_codes` for a batch of ``L`` layers (tensors on the device).

    ``codes [L, out, in]`` grid values (scaled units); ``loss`` the objective of those codes
    per layer ``[L]``; ``start_loss`` that of the starting codes; ``rtn_loss`` that of
    round-to-nearest; ``iterations`` steps applied; ``lr_history`` the LR used at each step.
    """

    codes: torch.Tensor
    loss: torch.Tensor
    start_loss: torch.Tensor
    rtn_loss: torch.Tensor
    iterations: int
    stop_reason: str
    lr_history: list[float]
    loss_history: list[float]


def learn_codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    kind: Kind,
    objective: Objective,
    options: LearnedOptions,
    *,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    hook: Callable[[float], None] | None = None,
) -> SearchResult:
    """Search codes for ``w [L, out, in]`` with ``scale`` (broadcastable) under ``objective``.

    ``start`` is ``(codes, pre)`` from error feedback; without it the search starts at
    round-to-nearest (``pre = w / scale``). ``hook(fraction)`` is called at each host check
    (progress; it may raise to cancel). Runs under ``torch.no_grad``.
    """
    with torch.no_grad():
        return _Search(w.float(), scale.float(), kind, objective, options, start).run(hook)


class _Search:
    def __init__(
        self,
        w: torch.Tensor,
        scale: torch.Tensor,
        kind: Kind,
        objective: Objective,
        options: LearnedOptions,
        start: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self.w, self.s, self.kind, self.obj, self.opt = w, scale, kind, objective, options
        scaled = w / scale
        rtn = round_to_grid(scaled, kind)
        self.rtn_loss = objective.exact_loss(w - rtn * scale)
        codes, pre = start if start is not None else (rtn, scaled)
        self.codes, pre = codes.float(), pre.float()
        self.grad, group = self._loss(self.codes)
        self.best_codes, self.best_group = self.codes.clone(), group
        # without a start the codes are rtn itself: same loss, no second matmul
        self.start_loss = (
            self.rtn_loss if start is None else objective.exact_loss(w - self.codes * scale)
        )
        dev = w.device
        self.lr = torch.tensor(options.lr, dtype=torch.float64, device=dev)
        self.best_total = group.sum().double()
        self.stall = torch.zeros((), dtype=torch.int64, device=dev)
        self.bad = torch.zeros((), dtype=torch.int64, device=dev)
        self.cooldown = torch.zeros((), dtype=torch.int64, device=dev)
        self.steps = torch.zeros((), dtype=torch.int64, device=dev)
        self.active = torch.ones((), dtype=torch.bool, device=dev)
        self.lr_trace: list[torch.Tensor] = []
        self.loss_trace: list[torch.Tensor] = [self.best_total]
        self.row_step = torch.ones_like(group)[..., None]
        if options.optimizer == "original":
            self.curvature = objective.curvature()
            # 1 / (c·s): turns a gradient into the best single-weight move in code units
            self.step_per_grad = (self.curvature * scale).reciprocal()
        else:
            self.value = pre.clone()
            self.m = torch.zeros_like(self.value)
            self.v = torch.zeros_like(self.value)
            # gradients are scaled by the output energy so that lr means the same for any layer
            signal = objective.group_loss(w, objective.gradient(w)).sum()
            self.signal = signal.clamp_min(torch.finfo(torch.float32).tiny)

    def _loss(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(half-gradient, loss per group) of the error ``w − codes·s``."""
        e = torch.addcmul(self.w, codes, self.s, value=-1.0)
        g = self.obj.gradient(e)
        return g, self.obj.group_loss(e, g)

    def run(self, hook: Callable[[float], None] | None = None) -> SearchResult:
        opt = self.opt
        reason = "num_iter reached"
        for t in range(opt.num_iter):
            self._step(t)
            # the only host sync: every check_every steps
            checkpoint = (t + 1) % opt.check_every == 0 or t + 1 == opt.num_iter
            if checkpoint and hook is not None:
                hook((t + 1) / opt.num_iter)
            if checkpoint and not bool(self.active):
                reason = f"no improvement in {opt.early_stop} steps"
                break
        lrs = torch.stack(self.lr_trace).tolist() if self.lr_trace else []
        losses = torch.stack(self.loss_trace).tolist() if self.loss_trace else []
        steps = int(self.steps)
        return SearchResult(
            codes=self.best_codes,
            loss=self.obj.exact_loss(self.w - self.best_codes * self.s),
            start_loss=self.start_loss,
            rtn_loss=self.rtn_loss,
            iterations=steps,
            stop_reason=reason if opt.num_iter else "num_iter is 0",
            lr_history=lrs[:steps],
            loss_history=losses[: steps + 1],
        )

    def _step(self, t: int) -> None:
        self.lr_trace.append(self.lr.clone())
        proposal = self._propose(t)
        grad, group = self._loss(proposal)
        active = self.active
        better = (group < self.best_group) & active
        keep = better[..., None]
        self.best_codes = torch.where(keep, proposal, self.best_codes)
        self.best_group = torch.where(better, group, self.best_group)
        if self.opt.optimizer == "original":
            # coordinate descent continues from the kept codes; a row (group) that rejected
            # its move halves its own step, down to the single best weight whose predicted
            # gain is exact, so no row can stall on a repeated proposal
            self.codes = self.best_codes
            self.grad = torch.where(keep, grad, self.grad)
            self.row_step = torch.where(keep | ~active, self.row_step, self.row_step * 0.5)
        else:
            self.codes, self.grad = proposal, grad
        total = self.best_group.sum().double()
        self.loss_trace.append(total)
        improved = total < self.best_total * (1.0 - self.opt.lr_threshold)
        # as in ReduceLROnPlateau, the best total moves only on a significant improvement
        self.best_total = torch.where(improved, total, self.best_total)
        self._schedule(t, improved)
        self.steps = self.steps + active.long()
        self.stall = torch.where(improved, 0, self.stall + 1)
        self.active = active & (self.stall < self.opt.early_stop)

    def _propose(self, t: int) -> torch.Tensor:
        if self.opt.optimizer == "original":
            return self._coordinate_step()
        return self._adam_step(t)

    def _coordinate_step(self) -> torch.Tensor:
        """Move each row's ``⌈lr·in⌉`` weights with the largest predicted loss decrease.

        Written with few full-size passes (each is a memory-bound sweep of ``[out, in]``).
        """
        c = self.curvature
        q = self.codes
        # exact minimiser of the loss along one weight, in code units: q + g/(c·s), on the grid
        target = snap(torch.addcmul(q, self.grad, self.step_per_grad), self.kind)
        a = (target - q).mul_(self.s)  # the move in weight units
        # predicted decrease if only this weight moves: 2·a·g − a²·c = 2·a·(g − a·c/2)
        gain = torch.addcmul(self.grad, a, c, value=-0.5).mul_(a)
        n = q.shape[-1]
        k_max = max(1, math.ceil(min(self._lr_cap(), _CD_MAX_FRACTION) * n))
        top, idx = torch.topk(gain, k_max, dim=-1, sorted=True)
        k_now = torch.ceil(self.lr * n * self.row_step).clamp(1, k_max)
        rank = torch.arange(k_max, device=q.device)
        chosen = (top > 0) & (rank < k_now)
        moved = torch.where(chosen, target.gather(-1, idx), q.gather(-1, idx))
        return q.scatter(-1, idx, moved)

    def _lr_cap(self) -> float:
        """Largest LR any schedule can reach (host-side constant: no sync)."""
        if self.opt.schedule == "adaptive":
            return _ADAPTIVE_MAX
        return min(_ADAPTIVE_MAX, self.opt.lr)

    def _adam_step(self, t: int) -> torch.Tensor:
        """One AdamW / RAdam step on the continuous values (straight-through gradient)."""
        # d loss / d value: the error is w − round(value)·s, rounding passed straight through
        g = -2.0 * self.grad * self.s / self.signal
        value, self.m, self.v = adam_update(
            self.value,
            self.m,
            self.v,
            g,
            lr=self.lr,
            step=t + 1,
            rectified=self.opt.optimizer == "radam",
            weight_decay=self.opt.weight_decay,
        )
        self.value = torch.where(self.active, value, self.value)
        return snap(self.value, self.kind)

    def _schedule(self, t: int, improved: torch.Tensor) -> None:
        opt = self.opt
        lr = self.lr
        if opt.schedule == "exponential":
            new = (lr * opt.lr_gamma).clamp_min(opt.lr_min)
        elif opt.schedule == "adaptive":
            new = torch.where(
                improved, (lr * _ADAPTIVE_BOOST).clamp_max(_ADAPTIVE_MAX), lr * opt.lr_factor
            ).clamp_min(opt.lr_min)
        else:
            new = self._plateau(improved)
        self.lr = torch.where(self.active, new, lr)

    def _plateau(self, improved: torch.Tensor) -> torch.Tensor:
        """PyTorch's ReduceLROnPlateau (mode min, relative threshold), on device tensors."""
        opt = self.opt
        bad = torch.where(improved, 0, self.bad + 1)
        in_cooldown = self.cooldown > 0
        cooldown = torch.where(in_cooldown, self.cooldown - 1, self.cooldown)
        bad = torch.where(in_cooldown, 0, bad)
        reduce = bad > opt.lr_patience
        reduced = (self.lr * opt.lr_factor).clamp_min(opt.lr_min)
        # PyTorch skips reductions smaller than its eps (1e-8)
        new = torch.where(reduce & (self.lr - reduced > 1e-8), reduced, self.lr)
        active = self.active
        cooldown = torch.where(reduce, opt.lr_cooldown, cooldown)
        self.cooldown = torch.where(active, cooldown, self.cooldown)
        self.bad = torch.where(active, torch.where(reduce, 0, bad), self.bad)
        return new


def adam_update(
    value: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: torch.Tensor | float,
    step: int,
    rectified: bool,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step, or RAdam's (Liu et al. 2020) with ``rectified``; decoupled weight decay.

    Same arithmetic as ``torch.optim.AdamW`` / ``RAdam(decoupled_weight_decay=True)``, with
    ``lr`` allowed to be a device tensor (no host sync). ``step`` counts from 1. Returns the
    new ``(value, m, v)``.
    """
    beta1, beta2 = betas
    if weight_decay:
        value = value * (1 - lr * weight_decay)
    m = torch.lerp(m, grad, 1 - beta1)
    v = v * beta2 + (1 - beta2) * grad * grad
    correction1 = 1 - beta1**step
    correction2 = 1 - beta2**step
    if not rectified:
        denom = v.sqrt() / math.sqrt(correction2) + eps
        return value - (lr / correction1) * m / denom, m, v
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho = rho_inf - 2.0 * step * beta2**step / correction2
    if rho <= 5.0:  # warming up: plain momentum
        return value - lr * (m / correction1), m, v
    rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    adaptive = math.sqrt(correction2) / (v.sqrt() + eps)
    return value - lr * (m / correction1) * rect * adaptive, m, v
