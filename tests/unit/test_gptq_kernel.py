"""The Triton error-feedback kernel against the PyTorch reference, in Triton's interpreter.

The interpreter must be chosen before any kernel is defined, so the checks run in a fresh
Python process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from comfyui_quantizer.quant_core import error_feedback as ef, formats
    from comfyui_quantizer.quant_core.formats import Kind

    out = {}
    g = torch.Generator().manual_seed(0)
    for kind in (Kind.INT8, Kind.FP8):
        # feedback on: random correlated inputs, per-row and per-column scales, ragged blocks
        for name, per_col in (("row", False), ("col", True)):
            w = torch.randn(2, 37, 70, generator=g) * 0.1
            mix = torch.eye(70) + 0.3 * torch.randn(70, 70, generator=g)
            x = torch.randn(2, 300, 70, generator=g) @ mix * torch.rand(70, generator=g) * 3
            h = x.transpose(1, 2) @ x / 300
            s = w.abs().amax(-1, keepdim=True) / (127 if kind is Kind.INT8 else 448)
            if per_col:
                s = s * (1 + torch.rand(2, 37, 70, generator=g))
            ref = ef.error_feedback(w, s, h, kind, block=32, backend="torch")
            tri = ef.error_feedback(w, s, h, kind, block=32, backend="triton")
            out[f"{kind.value}-{name}"] = [torch.equal(ref[0], tri[0]), torch.equal(ref[1], tri[1])]
        # no feedback (diagonal H): codes are exactly the grid rounding, ties and saturation too
        grid = torch.unique(formats.round_to_grid(torch.linspace(-460, 460, 200001), kind))
        mids = (grid[1:] + grid[:-1]) / 2
        vals = torch.cat([grid, mids, torch.tensor([500.0, -500.0, 1e-5, -3e-3, 0.0])])
        vals = vals[torch.randint(len(vals), (64 * 60,), generator=g)].reshape(1, 64, 60)
        ones = torch.ones(1, 1, 1)
        eye = torch.eye(60)[None]
        codes, _ = ef.error_feedback(vals, ones, eye, kind, block=16, backend="triton")
        out[f"{kind.value}-grid"] = [torch.equal(codes, formats.round_to_grid(vals, kind))]
    print(json.dumps(out))
    """
)


def test_triton_block_kernel_equals_the_pytorch_reference_bit_for_bit() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result) == 6
    assert all(all(v) for v in result.values()), result
