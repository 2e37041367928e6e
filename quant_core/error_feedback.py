"""GPTQ-style error feedback: round one column at a time and push its error onto the rest.

For a layer with inputs of second moment ``H [in, in]`` the output error of a weight error
``E [out, in]`` is ``tr(E H Eᵀ)``. Rounding column ``j`` and spreading its error over the
columns not yet rounded, with the weights of the upper Cholesky factor ``U`` of ``H⁻¹``
(``UᵀU = H⁻¹``), makes the remaining error ``Σ_j ‖r_j‖² / U_jj²`` where ``r_j`` is column ``j``'s
rounding residual: each ``1/U_jj²`` is the part of ``H_jj`` not explained by earlier columns,
so correlated inputs cost much less than under round-to-nearest (which pays ``Σ_j ‖r_j‖² H_jj``).

Columns go in decreasing ``H_jj`` ("act order"): the loudest inputs are rounded first while
every later column can still absorb their error; measured on MiniLM it adds 0.3–2 dB over the
natural order. Each column is rounded with the same grid function as round-to-nearest
(:func:`.formats.round_to_grid` of ``w / scale``), so saturation and ties are identical.

Work is blocked (Frantar et al., "lazy batch updates"): inside a block of ``block`` columns the
feedback is sequential; the rest of the matrix is updated once per block with a matmul. On CUDA
the sequential part runs in one Triton kernel per block (``kernels/gptq.py``), elsewhere in
PyTorch; both compute the same function.

Shapes: a leading batch dimension ``L`` lets layers of one shape share every launch:
``w [L, out, in]``, ``scale`` broadcastable to it, ``h [L, in, in]``.
"""

from __future__ import annotations

import logging

import torch

from .formats import Kind, round_to_grid

log = logging.getLogger(__name__)

# Relative damping added to H's diagonal when its Cholesky factorization fails at first.
_DAMP_RETRIES = (10.0, 100.0, 1000.0)


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton block kernel can run on ``device``, and why not."""
    if device.type != "cuda":
        return False, f"device {device} is not CUDA"
    try:
        from ..kernels import gptq  # noqa: F401
    except ImportError as e:
        return False, f"Triton is not importable ({e})"
    return True, "ok"


def act_order(h: torch.Tensor) -> torch.Tensor:
    """Column order by decreasing ``H_jj`` (stable, so ties keep index order): ``[L, in]``."""
    return torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp · mean(diag H) · I``; an all-zero H becomes ``damp · I`` (``[L, in, in]``)."""
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    mean = diag.mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = h.clone()
    torch.diagonal(out, dim1=-2, dim2=-1).add_(damp * mean)
    return out


def inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper-triangular ``U`` with ``UᵀU = (H + damp·mean(diag)·I)⁻¹``: ``[L, in, in]``.

    Uses one Cholesky of the reversed matrix and one triangular inverse instead of an explicit
    inverse and a second factorization: if ``J H J = L Lᵀ`` (``J`` reverses the order) then
    ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular.
    """
    for extra in (1.0, *_DAMP_RETRIES):
        hd = damped(h.double() if h.device.type == "cpu" else h, max(damp, 1e-6) * extra)
        lower, info = torch.linalg.cholesky_ex(hd.flip(-1, -2))
        if not bool((info != 0).any()):
            break
        log.warning("H is not positive definite at damping %.3g; retrying with more", damp * extra)
    else:
        raise ValueError("second-moment matrix is not positive definite even with damping")
    eye = torch.eye(h.shape[-1], dtype=lower.dtype, device=lower.device).expand_as(lower)
    inv = torch.linalg.solve_triangular(lower, eye, upper=False)
    return inv.flip(-1, -2).to(torch.float32)


def error_feedback(
    w: torch.Tensor,
    scale: torch.Tensor,
    h: torch.Tensor,
    kind: Kind,
    *,
    damp: float = 0.01,
    block: int = 128,
    use_triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding in act order: ``w [L, out, in]`` -> ``(codes, pre)``, both ``[L, out, in]``.

    ``codes`` are grid values in scaled units (``Ŵ = codes · scale``); ``pre`` is the scaled
    value each column had just before it was rounded (``codes == round_to_grid(pre)``), the
    natural starting point of a continuous optimiser. ``scale`` broadcasts to ``w``.
    """
    w = w.float()
    full_scale = scale.float().expand_as(w)
    order = act_order(h)
    inverse = torch.argsort(order, dim=-1)
    idx = order[:, None, :].expand_as(w)
    wp = torch.gather(w, -1, idx).contiguous()
    sp = torch.gather(full_scale, -1, idx) if scale.shape[-1] != 1 else scale.float()
    hp = torch.gather(torch.gather(h, -1, order[:, None, :].expand_as(h)), -2,
                      order[:, :, None].expand_as(h))  # fmt: skip
    u = inverse_cholesky_upper(hp, damp)
    codes, pre = _blocked(wp, sp, u, kind, block, use_triton)
    back = inverse[:, None, :].expand_as(w)
    return torch.gather(codes, -1, back), torch.gather(pre, -1, back)


def _blocked(
    w: torch.Tensor, s: torch.Tensor, u: torch.Tensor, kind: Kind, block: int, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked feedback in the given column order; ``w`` is consumed (updated in place)."""
    n = w.shape[-1]
    codes = torch.empty_like(w)
    pre = torch.empty_like(w)
    per_col = s.dim() == w.dim() and s.shape[-1] != 1
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        sb = s[..., b0:b1] if per_col else s
        ub = u[:, b0:b1, b0:b1]
        if use_triton:
            from ..kernels.gptq import gptq_block

            err = gptq_block(w[..., b0:b1], sb, ub, kind.value, codes[..., b0:b1], pre[..., b0:b1])
        else:
            err = _block_reference(w[..., b0:b1], sb, ub, kind, codes[..., b0:b1], pre[..., b0:b1])
        if b1 < n:
            # the one big product of each block: feed its errors to every later column
            w[..., b1:] -= err @ u[:, b0:b1, b1:]
    return codes, pre


def _block_reference(
    wb: torch.Tensor,
    sb: torch.Tensor,
    ub: torch.Tensor,
    kind: Kind,
    codes: torch.Tensor,
    pre: torch.Tensor,
) -> torch.Tensor:
    """Sequential feedback inside one block (PyTorch); fills ``codes``/``pre``, returns errors.

    ``wb [L, out, B]`` values, ``sb`` its scale (broadcastable), ``ub [L, B, B]``. The error
    fed forward is ``(w̃_j − ŵ_j) / U_jj``, in weight units.
    """
    wb = wb.clone()
    err = torch.empty_like(wb)
    per_col = sb.dim() == wb.dim() and sb.shape[-1] != 1
    for j in range(wb.shape[-1]):
        s = sb[..., j] if per_col else sb[..., 0]
        x = wb[..., j] / s
        q = round_to_grid(x, kind)
        codes[..., j] = q
        pre[..., j] = x
        e = (wb[..., j] - q * s) / ub[:, j, j, None]
        err[..., j] = e
        wb[..., j + 1 :] -= e[..., None] * ub[:, None, j, j + 1 :]
    return err
