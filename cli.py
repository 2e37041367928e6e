"""``comfy-quantize``: the command-line front end over ``quant_core.quantize_model``.

Flags follow the reference tool (convert_to_quant) for everyday use; the default output is FP8
per-tensor, which stock ComfyUI loads. Errors print one line (a traceback only with
``--verbose``) and exit non-zero; no partial output is ever left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .quant_core import (
    Cancelled,
    QuantConfig,
    QuantError,
    Report,
    SafetensorsSource,
    dry_run,
    plan_model,
    quantize_model,
)
from .quant_core.config import OUTPUT_DTYPES
from .quant_core.pipeline import Progress

EXIT_ERROR = 1
EXIT_CANCELLED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="comfy-quantize",
        description="Quantize a safetensors model to an 8-bit ComfyUI checkpoint (FP8 or INT8).",
    )
    p.add_argument("-i", "--input", required=True, help="input .safetensors file")
    p.add_argument(
        "-o", "--output", help="output file (default: next to the input, named after the format)"
    )
    p.add_argument("--int8", action="store_true", help="INT8 codes instead of FP8 E4M3")
    p.add_argument(
        "--scaling-mode",
        "--scaling_mode",
        dest="scaling_mode",
        default="tensor",
        choices=["tensor", "row", "block"],
        help="scale granularity: tensor (default), row, or block (pack-only for FP8 and INT8)",
    )
    p.add_argument(
        "--block_size",
        "--block-size",
        dest="block_size",
        type=int,
        default=128,
        help="block edge for --scaling-mode block (default 128)",
    )
    p.add_argument("--simple", action="store_true", help="round-to-nearest (no learned rounding)")
    p.add_argument(
        "--comfy_quant",
        "--comfy-quant",
        action="store_true",
        help="accepted for compatibility; the output always carries ComfyUI's metadata",
    )
    p.add_argument("--device", default="cpu", help="where the math runs: cpu (default) or cuda[:N]")
    p.add_argument(
        "--manual_seed",
        "--manual-seed",
        dest="manual_seed",
        type=int,
        default=0,
        help="seed for anything random (default 0)",
    )
    p.add_argument(
        "--output-dtype",
        "--output_dtype",
        dest="output_dtype",
        choices=sorted(OUTPUT_DTYPES),
        help="cast the tensors that stay unquantized (default: keep their dtype)",
    )
    p.add_argument(
        "--upgrade-legacy",
        action="store_true",
        help="rewrite a legacy scaled_fp8 checkpoint losslessly in the comfy_quant layout",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan; read and write no tensor data"
    )
    p.add_argument("--report", metavar="FILE.json", help="write the per-layer report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--all-layers", action="store_true", help="list kept tensors in the table too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; tracebacks on errors"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        kind="int8" if args.int8 else "fp8",
        scaling=args.scaling_mode,
        block_size=args.block_size,
        rounding="nearest",
        output_dtype=args.output_dtype,
        device=args.device,
        seed=args.manual_seed,
        upgrade_legacy=args.upgrade_legacy,
    )


def default_output(input_path: Path, config: QuantConfig) -> Path:
    """``model.safetensors`` -> ``model_int8_row.safetensors`` (next to the input)."""
    fmt = config.format
    tag = fmt.label.replace("/", "_")
    return input_path.with_name(f"{input_path.stem}_{tag}.safetensors")


class _ProgressBar:
    """tqdm bar over input bytes (so the ETA follows the real work), with the layer name."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        self._enabled = enabled

    def __call__(self, p: Progress) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, unit_divisor=1024,
                             dynamic_ncols=True, desc="quantizing")  # fmt: skip
        self._bar.set_postfix_str(p.current[-40:], refresh=False)
        self._bar.update(p.bytes_done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run(args: argparse.Namespace) -> Report:
    config = config_from_args(args)
    input_path = Path(args.input)
    output = Path(args.output) if args.output else default_output(input_path, config)
    with SafetensorsSource(input_path) as source:
        plan = plan_model(source, config)  # header only: warn before any long work starts
        if not plan.stock_loadable:
            print(
                "comfy-quantize: WARNING: the output NEEDS the comfyui-quantizer pack to load in "
                f"ComfyUI (pack-only formats: {', '.join(plan.pack_only_formats)})",
                file=sys.stderr,
            )
        if args.dry_run:
            report = dry_run(source, config, output)
        else:
            bar = _ProgressBar(enabled=not args.no_progress and sys.stderr.isatty())
            try:
                report = quantize_model(
                    source, config, output, overwrite=args.overwrite, progress=bar
                )
            finally:
                bar.close()
    print(report.table(all_layers=args.all_layers))
    print(report.summary())
    if not args.dry_run:
        print(f"wrote {output}")
    if args.report:
        report.write_json(args.report)
        print(f"report: {args.report}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        run(args)
    except QuantError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"comfy-quantize: error: {e}", file=sys.stderr)
        return EXIT_CANCELLED if isinstance(e, Cancelled) else EXIT_ERROR
    except KeyboardInterrupt:
        print("comfy-quantize: interrupted; no output written", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as e:  # a bug, not a user error: still one line unless --verbose
        if args.verbose:
            raise
        print(
            f"comfy-quantize: internal error: {type(e).__name__}: {e} (rerun with --verbose)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
