"""End-to-end tests need a real ComfyUI: COMFYUI_DIR (source tree) and COMFYUI_PYTHON."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness import make_tiny_flux


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [v for v in ("COMFYUI_DIR", "COMFYUI_PYTHON") if not os.environ.get(v)]
    if not missing:
        return
    reason = (
        f"no real ComfyUI configured ({', '.join(missing)} unset); "
        "see COMFYUI.md / README to run `make e2e`"
    )
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Flux (seed 0, hidden 128) several modules use, built once; read only:
    tests copy it or write their outputs elsewhere."""
    return make_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny_flux.safetensors")
