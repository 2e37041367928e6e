"""Files written by the CLI load in a real, unmodified ComfyUI and sample close to bf16."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .harness import ComfyServer, cli, read_latent, sample_graph


@pytest.fixture(scope="module")
def quantized(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("stock")  # tiny_flux (conftest.py) is shared: read only
    out = {}
    for name, flags in {"fp8": [], "int8row": ["--int8", "--scaling-mode", "row"]}.items():
        dest = folder / f"tiny_flux_{name}.safetensors"
        done = cli("-i", str(tiny_flux), "-o", str(dest), *flags)
        assert done.returncode == 0, done.stderr
        out[name] = dest
    return out


def test_stock_comfyui_loads_and_samples_within_bound(
    tiny_flux: Path, quantized: dict[str, Path]
) -> None:
    # Stock ComfyUI: the pack is NOT installed, so this checks the files, not our runtime.
    with ComfyServer(with_pack=False) as server:
        for path in [tiny_flux, *quantized.values()]:
            shutil.copy(path, server.folder("diffusion_models") / path.name)
        latents = {}
        for path in [tiny_flux, *quantized.values()]:
            result = server.run(sample_graph(path.name, latent_prefix=path.stem))
            assert result.status == "success", (result.events[-1:], server.log[-3000:])
            latents[path.stem] = read_latent(server, path.stem)
    ref = latents[tiny_flux.stem]
    bounds = {"fp8": 0.05, "int8row": 0.02}
    for name, bound in bounds.items():
        got = latents[quantized[name].stem]
        rel = float((got - ref).norm() / ref.norm())
        assert 0 < rel < bound, f"{name}: relative latent error {rel:.4f} (bound {bound})"
