"""Calibration statistics: recorder keys, moments against float64, file round trip, sketch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from comfyui_quantizer.quant_core.calibration import (
    CalibrationFile,
    CalibrationRecorder,
    match_keys,
)
from comfyui_quantizer.quant_core.errors import ConfigError, InputError


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(12, 36), "proj": nn.Linear(12, 12)})
        self.mlp = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, _, v = self.attn["qkv"](h).chunk(3, -1)
        x = x + self.attn["proj"](q * v)
        return x + self.mlp(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _inputs(seed: int, batches: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g)
    return [torch.randn(4, 7, 12, generator=g) @ mix + 0.5 for _ in range(batches)]


def test_keys_are_the_modules_state_dict_weight_names() -> None:
    torch.manual_seed(0)
    net = _Net()
    with CalibrationRecorder(net) as rec, torch.no_grad():
        net(_inputs(1)[0])
    linear_weights = {k for k in net.state_dict() if k.endswith(".weight") and "norm" not in k}
    keys = set(rec.keys())
    assert keys == linear_weights
    assert "blocks.0.attn.qkv.weight" in keys


def test_moments_equal_float64_reference_of_the_captured_inputs() -> None:
    torch.manual_seed(0)
    net = _Net()
    seen: list[torch.Tensor] = []
    handle = (
        net.blocks[1]
        .mlp[2]
        .register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 24).double()))
    )
    with CalibrationRecorder(net, holdout=0.3) as rec, torch.no_grad():
        for x in _inputs(2):
            net(x)
    handle.remove()
    x = torch.cat(seen)
    st = rec.stats()["blocks.1.mlp.2.weight"]
    assert st.check is not None
    n_fit, n_check = st.fit.count, st.check.count
    assert n_fit + n_check == x.shape[0] and n_fit > 0 and n_check > 0
    # the two parts together are all rows: compare their pooled moments with float64 ones
    pooled = (n_fit * st.fit.second_moment.double() + n_check * st.check.second_moment.double()) / (
        n_fit + n_check
    )
    ref = x.T @ x / x.shape[0]
    assert torch.allclose(pooled, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    mean = (n_fit * st.fit.mean.double() + n_check * st.check.mean.double()) / x.shape[0]
    assert torch.allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
    assert float(st.absmax) == pytest.approx(x.abs().max().item(), rel=1e-6)
    # covariance = second moment − mean meanᵀ
    cov = st.fit.covariance.double()
    expect = st.fit.second_moment.double() - torch.outer(st.fit.mean.double(), st.fit.mean.double())
    assert torch.allclose(cov, expect, atol=1e-6)


def test_holdout_split_is_seeded_and_can_be_off() -> None:
    torch.manual_seed(0)
    net = _Net()

    def counts(seed: int, holdout: float) -> list[int]:
        with CalibrationRecorder(net, holdout=holdout, seed=seed) as rec, torch.no_grad():
            for x in _inputs(3):
                net(x)
        st = rec.stats()["head.weight"]
        return [st.fit.count, st.check.count if st.check else 0]

    assert counts(5, 0.4) == counts(5, 0.4)
    assert counts(0, 0.0)[1] == 0
    with pytest.raises(ConfigError):
        CalibrationRecorder(net, holdout=1.0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Net()
    with CalibrationRecorder(net) as rec, torch.no_grad():
        for x in _inputs(4):
            net(x)
    path = tmp_path / "cal.safetensors"
    rec.save(path)
    direct = rec.stats()
    lazy = CalibrationFile(path)
    assert set(direct) == set(lazy.keys())
    for key, st in direct.items():
        other = lazy.get(key)
        assert other is not None
        for part in ("fit", "check"):
            a, b = getattr(st, part), getattr(other, part)
            assert torch.equal(a.second_moment, b.second_moment)
            assert torch.equal(a.mean, b.mean) and a.count == b.count
            assert torch.equal(a.absmax, b.absmax)
    assert lazy.get("nope.weight") is None


def test_a_file_that_is_not_calibration_is_refused(tmp_path: Path, write_model) -> None:
    model = write_model({"a.weight": torch.randn(4, 4)})
    with pytest.raises(InputError, match="not a calibration file"):
        CalibrationFile(model)


def test_sketch_bounds_memory_and_keeps_the_diagonal_exact() -> None:
    g = torch.Generator().manual_seed(0)
    features, rank = 96, 16
    lin = nn.Linear(features, 8)
    basis = torch.randn(8, features, generator=g)
    xs = [torch.randn(50, 8, generator=g) @ basis + 0.3 * torch.randn(50, features, generator=g)
          for _ in range(6)]  # fmt: skip
    with CalibrationRecorder(lin, holdout=0.0, sketch_above=64, sketch_rank=rank) as rec:
        for x in xs:
            lin(x)
    tensors = rec.tensors()
    assert tensors["weight/fit/sketch"].shape[0] <= 2 * rank  # bounded, whatever the row count
    st = rec.stats()["weight"]
    assert st.fit.sketched
    x = torch.cat(xs).double()
    ref = x.T @ x / x.shape[0]
    h = st.fit.second_moment.double()
    assert torch.allclose(torch.diagonal(h), torch.diagonal(ref), rtol=1e-5)
    # Frequent Directions: 0 ⪯ XᵀX − BᵀB and ‖XᵀX − BᵀB‖₂ ≤ ‖X‖²_F / rank (per row: / n)
    b = tensors["weight/fit/sketch"].double()
    gap = ref - b.T @ b / x.shape[0]
    assert torch.linalg.eigvalsh(gap).min() > -1e-6 * ref.abs().max()
    assert torch.linalg.matrix_norm(gap, ord=2) <= (x**2).sum() / x.shape[0] / rank * 1.0001
    # the dominant 8-dimensional structure is kept almost entirely
    rel = torch.linalg.matrix_norm(ref - h) / torch.linalg.matrix_norm(ref)
    assert rel < 0.05


def test_match_keys_handles_prefixes_both_ways() -> None:
    calib = ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "head.weight"]
    weights = [
        "model.diffusion_model.blocks.0.attn.qkv.weight",  # prefixed checkpoint
        "blocks.1.attn.qkv.weight",  # exact
        "head.weight",
        "other.weight",
    ]
    assert match_keys(weights, calib) == {
        weights[0]: calib[0],
        weights[1]: calib[1],
        "head.weight": "head.weight",
    }
    # calibration recorded on a wrapper module: unique longer key matches, ambiguous does not
    wrapped = ["net.blocks.0.attn.qkv.weight", "net.head.weight", "a.x.weight", "b.x.weight"]
    assert match_keys(["blocks.0.attn.qkv.weight", "head.weight", "x.weight"], wrapped) == {
        "blocks.0.attn.qkv.weight": wrapped[0],
        "head.weight": wrapped[1],
    }
