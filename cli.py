"""``comfy-quantize``: the command-line front end over ``quant_core.quantize_model``.

Flags follow the reference tool (convert_to_quant) for everyday use; the default output is FP8
per-tensor, which stock ComfyUI loads. Errors print one line (a traceback only with
``--verbose``) and exit non-zero; no partial output is ever left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .quant_core import (
    Cancelled,
    QuantConfig,
    QuantError,
    Report,
    SafetensorsSource,
    default_cpu_threads,
    detect,
    formats,
    plan_model,
    presets,
    quantize_model,
)
from .quant_core.config import OUTPUT_DTYPES
from .quant_core.errors import ConfigError
from .quant_core.layer_config import FORMAT_NAMES, UNWRITABLE_FORMATS, load_layer_config
from .quant_core.learned import OBJECTIVES, OPTIMIZERS, SCHEDULES, LearnedOptions
from .quant_core.pipeline import Progress
from .quant_core.rules import RuleOptions, layer_config_template

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
        "--threads",
        type=int,
        default=None,
        help="CPU worker threads for the math (default: one per core, at most 8)",
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
    add_rule_arguments(p)
    _add_learned_arguments(p)
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        kind="int8" if args.int8 else "fp8",
        scaling=args.scaling_mode,
        block_size=args.block_size,
        rounding=_rounding(args),
        output_dtype=args.output_dtype,
        device=args.device,
        seed=args.manual_seed,
        upgrade_legacy=args.upgrade_legacy,
        cpu_threads=args.threads if args.threads is not None else default_cpu_threads(),
        rules=rule_options_from_args(args),
        learned=_learned_options(args),
        calibration=args.calibration,
    )


# --- which layer gets what: presets, layer config, tiers (issue 3) ----------------------------


def add_rule_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose per layer: preset, layer config, custom/exclude/fallback, heur."""
    g = p.add_argument_group(
        "which layers get what",
        "The architecture is detected from the file (--preset auto). Layer names are tensor keys "
        "without '.weight'. Precedence: layer config > --custom-layers > --exclude-layers > "
        "preset keeps > --heur > primary format; norms, embeddings and keys the loader reads "
        "shapes from are never quantized. See --help-filters and --help-experimental.",
    )
    g.add_argument(
        "--preset",
        default="auto",
        metavar="NAME",
        help="rules for a model family: auto (default: detect) or one of "
        + ", ".join(presets.SELECTABLE),
    )
    for preset in presets.PRESETS:
        if preset.selectable and preset.flags:
            g.add_argument(
                *preset.flags,
                dest="preset_flags",
                action="append_const",
                const=preset.name,
                help=f"same as --preset {preset.name}",
            )
    g.add_argument(
        "--layer-config",
        "--layer_config",
        dest="layer_config",
        metavar="FILE.json",
        help="ordered per-layer rules (regex -> format or skip); see --help-experimental",
    )
    g.add_argument(
        "--fullmatch",
        "--layer-config-fullmatch",
        dest="fullmatch",
        action="store_true",
        help="layer-config patterns must match the whole name",
    )
    g.add_argument(
        "--layer-config-template",
        dest="layer_config_template",
        metavar="FILE.json",
        help="write a layer-config template (one rule per layer family of this model) "
        "and the plan; implies --dry-run",
    )
    g.add_argument(
        "--custom-layers",
        "--custom_layers",
        dest="custom_layers",
        metavar="REGEX",
        help="layers whose name matches get --custom-type",
    )
    g.add_argument(
        "--custom-type",
        "--custom_type",
        dest="custom_type",
        metavar="FORMAT",
        help="format for --custom-layers: fp8, int8 or a ComfyUI format name",
    )
    g.add_argument(
        "--custom-scaling-mode",
        "--custom_scaling_mode",
        dest="custom_scaling",
        metavar="MODE",
        help="tensor, row or block (default: --scaling-mode)",
    )
    g.add_argument(
        "--custom-block-size",
        "--custom_block_size",
        dest="custom_block_size",
        type=int,
        metavar="N",
        help="block edge for custom block scaling",
    )
    g.add_argument(
        "--exclude-layers",
        "--exclude_layers",
        dest="exclude_layers",
        metavar="REGEX",
        help="layers whose name matches stay in high precision",
    )
    g.add_argument(
        "--fallback",
        metavar="FORMAT",
        help="fp8 (per tensor) or int8 (per row) for layers the chosen format cannot "
        "take (shape not a multiple of the block size)",
    )
    g.add_argument(
        "--heur",
        action="store_true",
        help="keep layers too small or too thin for 8-bit to pay off (with the reason)",
    )
    g.add_argument(
        "--help-filters",
        action=_PrintAndExit,
        text=filters_help,
        help="list the presets and what each keeps, then exit",
    )
    g.add_argument("--help-experimental", action=_PrintAndExit, text=experimental_help,
                   help="list pack-only formats and what loading needs, then exit")  # fmt: skip


def rule_options_from_args(args: argparse.Namespace) -> RuleOptions:
    chosen = set(args.preset_flags or [])
    if args.preset != "auto":
        chosen.add(args.preset)
    if len(chosen) > 1:
        raise ConfigError(f"choose one preset, got {', '.join(sorted(chosen))}")
    return RuleOptions(
        preset=chosen.pop() if chosen else "auto",
        layer_config=load_layer_config(args.layer_config) if args.layer_config else None,
        custom_layers=args.custom_layers,
        custom_type=args.custom_type,
        custom_scaling=args.custom_scaling,
        custom_block_size=args.custom_block_size,
        exclude_layers=args.exclude_layers,
        fallback=args.fallback,
        heur=args.heur,
        fullmatch=args.fullmatch,
    )


class _PrintAndExit(argparse.Action):
    """``--help-filters``-style flag: print a text and exit (like ``--version``)."""

    def __init__(
        self, option_strings: list[str], dest: str, text: Callable[[], str], help: str
    ) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, help=help)
        self.text = text

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(self.text())  # to stdout, like --help
        parser.exit()


def filters_help() -> str:
    """Every preset: its flag, the architectures detected as it, what it keeps and drops."""
    detected: dict[str, list[str]] = {}
    for sig in detect.SIGNATURES:
        names = detected.setdefault(sig.preset, [])
        if sig.label not in names:
            names.append(sig.label)
    out = [
        "Presets (--preset NAME; default auto: detected per part of the file).",
        "Every preset adds its rules to the base rules. Patterns match tensor keys relative to",
        "their part of the file (model.diffusion_model., text_encoders.NAME., ...).",
    ]
    for p in presets.PRESETS:
        flags = ", ".join((f"--preset {p.name}", *p.flags)) if p.selectable else "detection only"
        out += ["", f"{p.name}  [{flags}]  {p.summary}"]
        if p.name in detected:
            out.append(f"    detected for: {', '.join(detected[p.name])}")
        out += [f"    {line}" for line in presets.describe(p)]
    return "\n".join(out)


def experimental_help() -> str:
    """Formats stock ComfyUI cannot load, what they need, and the per-layer options."""
    out = ["Formats written by this pack (format name, label, flags, who loads it):"]
    for kind in formats.Kind:
        for scaling in formats.Scaling:
            fmt = formats.Format(kind, scaling, 128 if scaling is formats.Scaling.BLOCK else None)
            flags = f"--scaling-mode {scaling.value}" + (
                " --int8" if kind is formats.Kind.INT8 else ""
            )
            where = "stock ComfyUI" if fmt.stock_loadable else "PACK-ONLY"
            out.append(f"  {fmt.name:26s} {fmt.label:14s} {flags:32s} {where}")
    out += [
        "",
        "PACK-ONLY files load only in a ComfyUI that has the comfyui-quantizer pack in",
        "custom_nodes (the pack registers its layouts when ComfyUI imports it). Stock ComfyUI",
        "refuses the whole file: an unknown format aborts the model load. The dry run, the",
        "report and the file's header (comfyui_quantizer.requires_pack) say when a file needs it.",
    ]
    out += [
        "",
        f"Format names accepted by --custom-type, --fallback and layer configs: "
        f"{', '.join(FORMAT_NAMES)}.",
        f"Never written (an error, not a substitution): {', '.join(UNWRITABLE_FORMATS)}.",
        "",
        "Layer config (--layer-config FILE.json), rules tried in order, first match decides:",
        '  {"_default": {"format": "int8", "scaling": "row"},',
        '   "rules": [{"pattern": "final_layer", "skip": true},',
        '             {"pattern": "attn", "format": "fp8", "rounding": "learned"}]}',
        "  Keys of a rule: pattern, format, scaling, block_size, rounding, skip, _comment.",
        "  --layer-config-template FILE writes one commented rule per layer family of a model.",
    ]
    return "\n".join(out)  # fmt: skip


# --- end of issue 3 options ---------------------------------------------------------------------


# --- learned rounding (issue 4) ----------------------------------------------------------------
_LEARNED_DEFAULTS = LearnedOptions()


def _add_learned_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "learned rounding",
        "With --calibration the codes minimise each layer's output error on recorded inputs "
        "(error feedback + coordinate descent; a guard keeps round-to-nearest wherever it is "
        "not better on held-out rows). --simple forces round-to-nearest.",
    )
    d = _LEARNED_DEFAULTS

    def opt(*names: str, **kw: object) -> None:
        g.add_argument(*names, **kw)  # type: ignore[arg-type]

    opt(
        "--calibration",
        metavar="CAL",
        help="calibration statistics (.safetensors from "
        "CalibrationRecorder); makes learned rounding the default",
    )
    opt(
        "--learned",
        action="store_true",
        help="learned rounding without --calibration (needs --objective svd)",
    )
    opt(
        "--objective",
        choices=OBJECTIVES,
        default=d.objective,
        help="output: E||X(W-Ŵ)ᵀ||² "
        "on the calibration inputs (default); svd: the reference tool's data-free proxy",
    )
    opt(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="original: coordinate descent on the codes (default); adamw/radam: "
        "straight-through gradient steps",
    )
    opt(
        "--lr",
        type=float,
        default=d.lr,
        help=f"initial learning rate (default {d.lr}; "
        "for original: the fraction of a row moved per step)",
    )
    opt(
        "--num_iter",
        "--num-iter",
        dest="num_iter",
        type=int,
        default=d.num_iter,
        help=f"refinement steps per layer (default {d.num_iter})",
    )
    opt(
        "--lr_schedule",
        "--lr-schedule",
        dest="lr_schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help=f"LR schedule (default {d.schedule})",
    )
    opt("--lr_gamma", type=float, default=d.lr_gamma, help="exponential: factor per step")
    opt(
        "--lr_patience",
        type=int,
        default=d.lr_patience,
        help="plateau: steps without improvement before a decay",
    )
    opt("--lr_factor", type=float, default=d.lr_factor, help="plateau/adaptive: decay factor")
    opt(
        "--lr_cooldown",
        type=int,
        default=d.lr_cooldown,
        help="plateau: steps after a decay before counting again",
    )
    opt("--lr_min", type=float, default=d.lr_min, help="lower bound of the LR")
    opt(
        "--lr_threshold",
        type=float,
        default=d.lr_threshold,
        help="relative loss decrease that counts as an improvement",
    )
    opt(
        "--early_stop",
        "--early-stop",
        dest="early_stop",
        type=int,
        default=d.early_stop,
        help=f"stop after this many steps without improvement (default {d.early_stop})",
    )
    opt("--top_p", type=float, default=d.top_p, help="svd: fraction of singular vectors")
    opt("--min_k", type=int, default=d.min_k, help="svd: least number of singular vectors")
    opt("--max_k", type=int, default=d.max_k, help="svd: most number of singular vectors")
    opt("--damp", type=float, default=d.damp, help="relative ridge added to the statistics")
    opt(
        "--no-error-feedback",
        dest="error_feedback",
        action="store_false",
        help="start the search from round-to-nearest instead of GPTQ-style error feedback",
    )
    opt(
        "--no-bias-correction",
        dest="bias_correction",
        action="store_false",
        help="keep biases as they are (default: absorb the mean output error)",
    )
    opt("--no-input-scale", dest="input_scale", action="store_false",
        help="do not write a calibrated input_scale for FP8 per-tensor layers")  # fmt: skip


def _rounding(args: argparse.Namespace) -> str:
    if args.simple:
        return "nearest"
    return "learned" if args.calibration or args.learned else "nearest"


def _learned_options(args: argparse.Namespace) -> LearnedOptions:
    return LearnedOptions(
        objective=args.objective,
        error_feedback=args.error_feedback,
        damp=args.damp,
        optimizer=args.optimizer,
        lr=args.lr,
        num_iter=args.num_iter,
        schedule=args.lr_schedule,
        lr_gamma=args.lr_gamma,
        lr_patience=args.lr_patience,
        lr_factor=args.lr_factor,
        lr_cooldown=args.lr_cooldown,
        lr_min=args.lr_min,
        lr_threshold=args.lr_threshold,
        early_stop=args.early_stop,
        top_p=args.top_p,
        min_k=args.min_k,
        max_k=args.max_k,
        bias_correction=args.bias_correction,
        input_scale=args.input_scale,
    )


# --- end learned rounding ----------------------------------------------------------------------


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
    dry = args.dry_run or bool(args.layer_config_template)
    with SafetensorsSource(input_path) as source:
        plan = plan_model(source, config)  # header only: warn before any long work starts
        if not plan.stock_loadable:
            print(
                "comfy-quantize: WARNING: the output NEEDS the comfyui-quantizer pack to load in "
                f"ComfyUI (pack-only formats: {', '.join(plan.pack_only_formats)})",
                file=sys.stderr,
            )
        if args.layer_config_template:
            template = layer_config_template(source.name, source.tensors(), config)
            Path(args.layer_config_template).write_text(
                json.dumps(template, indent=2) + "\n", encoding="utf-8"
            )
        if dry:
            report = Report.from_plan(plan, output, dry_run=True)  # the plan made above
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
    if not dry:
        print(f"wrote {output}")
    if args.layer_config_template:
        print(f"layer config template: {args.layer_config_template}")
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
