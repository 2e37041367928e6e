"""Which tensor becomes what: detection + presets + layer config + options -> one decision each.

:func:`decide_all` is a pure function of the header (names, dtypes, shapes) and the config; it
reads no tensor data, so the plan, the dry run and the real conversion all see the same
decisions. The precedence of the tiers is documented in :mod:`.presets` and implemented in
``_Resolver.decide`` in that order.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import comfy_quant, dtypes
from .comfy_quant import WEIGHT_SUFFIX
from .detect import (
    CLIP,
    DIFFUSERS,
    UNKNOWN,
    VAE,
    Component,
    Detection,
    detect,
    layer_families,
)
from .errors import ConfigError, InputError
from .formats import Format, Kind, Scaling
from .layer_config import FormatSpec, LayerConfig, LayerRule, TemplateLayer, parse_format
from .layer_config import template as template_from_layers
from .presets import BASE, PRESET_BY_NAME, SELECTABLE, SOURCE_DTYPE, Pattern, Preset
from .source import TensorInfo

if TYPE_CHECKING:
    from .config import QuantConfig

# 8-bit matmul kernels (cuBLASLt FP8, comfy-kitchen INT8) need both dimensions to be multiples
# of 16. Block scaling needs no more: a shape the blocks do not tile gets a padded scale grid
# (formats.py), which the pack's runtime loads.
MATMUL_ALIGNMENT = 16
# --heur: below this many weights the saving is under 64 KiB and not worth a scale per layer.
HEUR_MIN_WEIGHTS = 1 << 16
# --heur: a thinner matrix than this is a memory-bound matmul dominated by its activations.
HEUR_MAX_ASPECT = 16


class Tier(str, enum.Enum):
    """Which rule made a decision (in precedence order)."""

    DROP = "drop"
    STRUCTURE = "structure"
    PROTECT = "protect"
    LAYER_CONFIG = "layer-config"
    CUSTOM = "custom"
    EXCLUDE = "exclude"
    PRESET = "preset"
    HEUR = "heur"
    DEFAULT = "default"


@dataclass(frozen=True)
class Decision:
    """Quantize with ``fmt``, keep (``fmt is None``) or ``drop``, with the reason.

    ``keep_dtype`` (kept tensors only) is the safetensors dtype to write, set by a preset's
    dtype override; ``None`` lets ``--output-dtype`` decide. ``rounding`` is ``nearest`` or
    ``learned`` per layer. ``weight_only`` layers are stored 8-bit but multiplied in full
    precision (``full_precision_matrix_mult``): the ``--fallback`` for shapes the 8-bit matmul
    cannot take.
    """

    fmt: Format | None
    reason: str = ""
    rounding: str = "nearest"
    drop: bool = False
    keep_dtype: str | None = None
    tier: Tier = Tier.DEFAULT
    weight_only: bool = False


@dataclass(frozen=True, kw_only=True)
class RuleOptions:
    """How layers are chosen, beyond the primary format (all optional).

    - ``preset``: ``auto`` (detect per component) or a preset name (see ``--help-filters``)
    - ``layer_config``: a validated :class:`~.layer_config.LayerConfig`
    - ``custom_layers`` + ``custom_type`` (``custom_scaling``, ``custom_block_size``): layers
      whose name matches the regex get that format (default scaling/block: the primary's)
    - ``exclude_layers``: layers whose name matches stay in high precision
    - ``fallback``: ``fp8`` (per tensor) or ``int8`` (per row), stored weight-only, for layers
      whose shape the 8-bit matmul cannot take (a side not a multiple of 16)
    - ``heur``: keep layers too small or too thin for 8-bit to pay off
    - ``fullmatch``: layer-config patterns must match the whole layer name

    Layer names are tensor keys without ``.weight`` (prefixes included).
    """

    preset: str = "auto"
    layer_config: LayerConfig | None = None
    custom_layers: str | None = None
    custom_type: str | None = None
    custom_scaling: str | None = None
    custom_block_size: int | None = None
    exclude_layers: str | None = None
    fallback: str | None = None
    heur: bool = False
    fullmatch: bool = False

    def __post_init__(self) -> None:
        if self.preset != "auto" and self.preset not in SELECTABLE:
            raise ConfigError(
                f"unknown preset {self.preset!r}; use 'auto' or one of {', '.join(SELECTABLE)}"
            )
        for option in ("custom_layers", "exclude_layers"):
            pattern = getattr(self, option)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    flag = "--" + option.replace("_", "-")
                    raise ConfigError(
                        f"{flag}: invalid regular expression {pattern!r}: {e}"
                    ) from None
        if (self.custom_layers is None) != (self.custom_type is None):
            raise ConfigError("--custom-layers and --custom-type must be given together")
        if self.custom_type is None and (
            self.custom_scaling is not None or self.custom_block_size is not None
        ):
            raise ConfigError("--custom-scaling-mode/--custom-block-size need --custom-type")
        self.custom_spec()
        self.fallback_format()

    def custom_spec(self) -> FormatSpec | None:
        """The validated ``--custom-type`` request (scaling/block inherit from the primary)."""
        if self.custom_type is None:
            return None
        return parse_format(
            self.custom_type,
            scaling=self.custom_scaling,
            block_size=self.custom_block_size,
            where="--custom-type",
        )

    def fallback_format(self) -> Format | None:
        """``--fallback``: ``fp8`` means FP8 per tensor, ``int8`` INT8 per row."""
        if self.fallback is None:
            return None
        spec = parse_format(self.fallback, where="--fallback")
        kind = spec.kind
        scaling = spec.scaling or (Scaling.TENSOR if kind is Kind.FP8 else Scaling.ROW)
        if scaling is Scaling.BLOCK:
            raise ConfigError(
                f"--fallback: must be a per-tensor or per-row format, not {self.fallback!r}"
            )
        return Format(kind, scaling)


@dataclass(frozen=True)
class Decisions:
    """Every key's decision plus what the user must know (architecture, warnings)."""

    detection: Detection
    by_key: Mapping[str, Decision]
    presets: Mapping[str, str]  # component prefix -> preset applied
    notes: tuple[str, ...]

    @property
    def architecture(self) -> str:
        return self.detection.summary


def shape_problem(fmt: Format, shape: tuple[int, ...]) -> str | None:
    """Why ``fmt``'s 8-bit matmul cannot take a ``[out, in]`` weight (``None`` if it can)."""
    out_features, in_features = shape
    if out_features % MATMUL_ALIGNMENT or in_features % MATMUL_ALIGNMENT:
        return f"shape {out_features}x{in_features} is not a multiple of 16 (8-bit matmul)"
    return None


def heuristic_problem(shape: tuple[int, ...]) -> str | None:
    """Why ``--heur`` keeps a weight of ``shape`` (``None`` if it does not)."""
    out_features, in_features = shape
    if out_features * in_features < HEUR_MIN_WEIGHTS:
        return f"--heur: {out_features * in_features} weights, too few to pay for 8-bit"
    aspect = max(out_features, in_features) / max(1, min(out_features, in_features))
    if aspect > HEUR_MAX_ASPECT:
        return f"--heur: aspect ratio {aspect:.0f}:1, a thin memory-bound matmul"
    return None


def decide_all(source_name: str, infos: Mapping[str, TensorInfo], config: QuantConfig) -> Decisions:
    """Decide every tensor of a file from its header; raises before any data is read.

    Raises :class:`InputError` for a file ComfyUI would load quantized silently wrong: only a
    text encoder whose loader ignores quantization (CLIP, T5 other than XXL, ...: role ``CLIP``
    in ``detect``), or a diffusion model in the diffusers layout (role ``DIFFUSERS``).
    """
    detection = detect(infos)
    _refuse_unloadable(source_name, detection)
    resolver = _Resolver(detection, config)
    by_key = {key: resolver.decide(key, info) for key, info in infos.items()}
    notes = resolver.notes + resolver.summary_notes(by_key)
    return Decisions(detection, by_key, resolver.preset_names, tuple(notes))


def layer_config_template(
    source_name: str, infos: Mapping[str, TensorInfo], config: QuantConfig
) -> dict[str, object]:
    """A layer-config template for this file: one commented rule per layer family.

    Lists only layers a rule can change (not structure, drops or protected keys); applied
    unchanged it reproduces the current plan.
    """
    decisions = decide_all(source_name, infos, config)
    fixed = {Tier.DROP, Tier.STRUCTURE, Tier.PROTECT}
    layers = [
        TemplateLayer(comfy_quant.layer_name(key), infos[key].shape, d.fmt, d.rounding, d.reason)
        for key, d in decisions.by_key.items()
        if d.tier not in fixed
    ]
    header = [
        f"Layer config template for {source_name} (architecture: {decisions.architecture}).",
        "Rules are tried in order; the first whose pattern matches the layer name (the key "
        "without .weight) decides. Unchanged, this file reproduces the current plan.",
        "'skip': true keeps a layer; 'format' is fp8/int8 (with 'scaling' tensor/row/block and "
        "'block_size') or a ComfyUI format name; 'rounding' is nearest or learned.",
        "Not listed: norms, biases, embeddings, 1-D tensors and keys the loader reads shapes "
        "from; no rule can quantize those.",
    ]
    return template_from_layers(
        layers, primary=config.format, rounding=config.rounding, header=header
    )


def _refuse_unloadable(source_name: str, detection: Detection) -> None:
    for c in detection.components:
        if c.role == DIFFUSERS:
            raise InputError(
                f"{source_name}: this is a {c.label} model in the diffusers layout "
                f"({', '.join(c.evidence)}); ComfyUI renames and fuses those keys when it loads "
                "the file and drops the quantization scales, so an 8-bit file would load "
                "silently wrong. Load it in ComfyUI and connect the MODEL to the Quantize node "
                "instead (or save it in ComfyUI's layout first)."
            )
    clips = [c for c in detection.components if c.role == CLIP]
    if clips and len(clips) == len(detection.components):
        c = clips[0]
        raise InputError(
            f"{source_name}: this is a {c.label} text encoder ({c.evidence[0]}); ComfyUI's loader "
            "for it ignores quantization (it would run the 8-bit codes as plain weights, "
            "silently wrong), so it is not quantized. Keep it in bf16/fp16."
        )


@dataclass(frozen=True)
class _Compiled:
    """One component's rules as compiled regexes: (regex, reason) in precedence order."""

    protect: tuple[tuple[re.Pattern[str], str], ...]
    keep: tuple[tuple[re.Pattern[str], str], ...]
    drop: tuple[tuple[re.Pattern[str], str], ...]
    dtype: tuple[tuple[re.Pattern[str], str, str], ...]


class _Resolver:
    """Applies the tiers to one key at a time; collects notes (built once per plan)."""

    def __init__(self, detection: Detection, config: QuantConfig) -> None:
        self.detection = detection
        self.config = config
        self.options: RuleOptions = config.rules
        self.primary = config.format
        self.notes: list[str] = []
        self.preset_names: dict[str, str] = {}
        self.compiled: dict[str, _Compiled] = {}
        lc = self.options.layer_config
        self.fullmatch = self.options.fullmatch  # first_match ORs in the file's own setting
        self.default_fmt, self.default_rounding = self.primary, config.rounding
        if lc is not None and lc.default is not None and not lc.default.skip:
            self.default_fmt, self.default_rounding = self._rule_format(lc.default)
        spec = self.options.custom_spec()
        self.custom = spec.resolve(self.primary) if spec is not None else None
        self.custom_re = _compile(self.options.custom_layers)
        self.exclude_re = _compile(self.options.exclude_layers)
        self.fallback = self.options.fallback_format()
        self._choose_presets()
        # counters for the summary notes
        self.fell_back: Counter[str] = Counter()
        self.protected_over_user: Counter[str] = Counter()
        self.unfit: Counter[str] = Counter()

    # --- presets per component -----------------------------------------------------------
    def _choose_presets(self) -> None:
        """Detected preset per component; an explicit preset replaces it on the parts of its
        role (or on the only part there is), with a warning where it contradicts detection."""
        explicit = self.options.preset
        parts = [c for c in self.detection.components if c.role not in (VAE, CLIP)]
        targets: set[str] = set()
        if explicit != "auto":
            targets = {c.prefix for c in parts if _role_accepts(PRESET_BY_NAME[explicit], c)}
            if not targets and len(parts) == 1:
                targets = {parts[0].prefix}
            if not targets:
                self.notes.append(
                    f"preset {explicit!r} ({PRESET_BY_NAME[explicit].role}) matches no part of "
                    "this file; the detected presets apply"
                )
        for c in self.detection.components:
            name = c.preset
            if c.role in (VAE, CLIP):
                name = "vae" if c.role == VAE else "clip"
                if c.role == CLIP:
                    self.notes.append(
                        f"{c.label} {c.where} stays unquantized: ComfyUI's loader for it ignores "
                        "quantization (silently wrong)"
                    )
            elif c.prefix in targets:
                name = explicit
                if c.arch is not None and not c.fits(explicit):
                    self.notes.append(
                        f"preset {explicit!r} does not fit the detected {c.label} {c.where} "
                        f"(from {', '.join(c.evidence)}); applying {explicit!r} as asked"
                    )
            elif c.arch is None:
                families = layer_families(c.keys)
                self.notes.append(
                    f"architecture not recognised {c.where}: only the base rules apply (norms, "
                    f"biases, embeddings, 1-D tensors stay); keys seen: {', '.join(families)}"
                    + (f" ... ({len(c.keys)} keys)" if len(c.keys) > len(families) else "")
                )
            self.preset_names[c.prefix] = name
            self.compiled[c.prefix] = _compile_preset(PRESET_BY_NAME[name], c)

    # --- one key ---------------------------------------------------------------------------
    def decide(self, key: str, info: TensorInfo) -> Decision:
        component = self.detection.component_for(key)
        rel = key[len(component.prefix) :]
        rules = self.compiled[component.prefix]

        why = _first(rules.drop, rel)
        if why is not None:
            return Decision(None, why, drop=True, tier=Tier.DROP)
        structural = _structure_problem(info, key)
        if structural is not None:
            return self._keep(structural, Tier.STRUCTURE, rules, rel, info)
        layer = comfy_quant.layer_name(key)
        why = _first(rules.protect, rel)
        if why is not None:
            self._note_user_rule_on_protected(layer)
            return self._keep(why, Tier.PROTECT, rules, rel, info)

        lc = self.options.layer_config
        rule = lc.first_match(layer, fullmatch=self.fullmatch) if lc is not None else None
        if rule is not None:
            if rule.skip:
                return self._keep(f"{_short(rule.name)}: skip", Tier.LAYER_CONFIG, rules, rel, info)
            fmt, rounding = self._rule_format(rule)
            return self._fit(fmt, rounding, _short(rule.name), Tier.LAYER_CONFIG, rules, rel, info)
        if self.custom is not None and self.custom_re is not None and self.custom_re.search(layer):
            rounding = self.config.rounding
            return self._fit(
                self.custom, rounding, "--custom-layers", Tier.CUSTOM, rules, rel, info
            )
        if self.exclude_re is not None and self.exclude_re.search(layer):
            return self._keep("excluded by --exclude-layers", Tier.EXCLUDE, rules, rel, info)
        why = _first(rules.keep, rel)
        if why is not None:
            return self._keep(why, Tier.PRESET, rules, rel, info)
        if self.options.heur:
            why = heuristic_problem(info.shape)
            if why is not None:
                return self._keep(why, Tier.HEUR, rules, rel, info)
        if lc is not None and lc.default is not None and lc.default.skip:
            return self._keep("layer config _default: skip", Tier.DEFAULT, rules, rel, info)
        return self._fit(
            self.default_fmt, self.default_rounding, "", Tier.DEFAULT, rules, rel, info
        )

    def _fit(
        self,
        fmt: Format,
        rounding: str,
        source: str,
        tier: Tier,
        rules: _Compiled,
        rel: str,
        info: TensorInfo,
    ) -> Decision:
        """``fmt`` if its matmul takes the shape, else the weight-only fallback, else keep."""
        problem = shape_problem(fmt, info.shape)
        if problem is None:
            return Decision(fmt, source, rounding, tier=tier)
        fb = self.fallback
        if fb is not None:
            self.fell_back[fb.label] += 1
            reason = f"{problem}; --fallback {fb.label}, weight-only"
            return Decision(fb, reason, self.config.rounding, tier=tier, weight_only=True)
        self.unfit[fmt.label] += 1
        return self._keep(problem, tier, rules, rel, info)

    def _keep(
        self, reason: str, tier: Tier, rules: _Compiled, rel: str, info: TensorInfo
    ) -> Decision:
        keep_dtype = None
        for regex, dtype, why in rules.dtype:
            if regex.search(rel):
                keep_dtype = info.dtype if dtype == SOURCE_DTYPE else dtype
                reason = f"{reason}; dtype kept: {why}"
                break
        return Decision(None, reason, keep_dtype=keep_dtype, tier=tier)

    def _rule_format(self, rule: LayerRule) -> tuple[Format, str]:
        lc = self.options.layer_config
        inherit, rounding = self.primary, self.config.rounding
        if lc is not None and lc.default is not None and lc.default is not rule:
            if lc.default.spec is not None:
                inherit = lc.default.spec.resolve(inherit)
            rounding = lc.default.rounding or rounding
        fmt = rule.spec.resolve(inherit) if rule.spec is not None else inherit
        return fmt, rule.rounding or rounding

    def _note_user_rule_on_protected(self, layer: str) -> None:
        lc = self.options.layer_config
        rule = lc.first_match(layer, fullmatch=self.fullmatch) if lc is not None else None
        if rule is not None and not rule.skip:
            self.protected_over_user[_short(rule.name)] += 1
        elif self.custom_re is not None and self.custom_re.search(layer):
            self.protected_over_user["--custom-layers"] += 1

    # --- notes after all keys -----------------------------------------------------------
    def summary_notes(self, by_key: Mapping[str, Decision]) -> list[str]:
        notes = [
            f"{n} layer(s) the 8-bit matmul cannot take (a side not a multiple of 16) are stored "
            f"in the fallback {label}, weight-only (full_precision_matrix_mult)"
            for label, n in self.fell_back.items()
        ]
        notes += [
            f"{n} layer(s) matched by {who} stay unquantized anyway: no rule can quantize norms, "
            "embeddings, keys the loader reads shapes from, or VAE/CLIP parts"
            for who, n in self.protected_over_user.items()
        ]
        for label, n in self.unfit.items():
            hint = "" if self.fallback is not None else "; --fallback fp8|int8 would quantize them"
            notes.append(
                f"{n} layer(s) stay unquantized: the 8-bit matmul of {label} cannot take their "
                f"shape (a side not a multiple of 16){hint}"
            )
        drops = sum(d.drop for d in by_key.values())
        if drops:
            example = next(d.reason for d in by_key.values() if d.drop)
            notes.append(f"{drops} tensor(s) dropped from the output ({example})")
        return notes


def _role_accepts(preset: Preset, component: Component) -> bool:
    return preset.role == "any" or component.role in (preset.role, UNKNOWN)


def _structure_problem(info: TensorInfo, key: str) -> str | None:
    if info.dtype not in dtypes.FLOAT_DTYPES:
        return f"{info.dtype} tensor (not floating point)"
    if not key.endswith(WEIGHT_SUFFIX):
        return "not a layer weight"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D tensor (only 2-D linear weights are quantized)"
    return None


def _first(patterns: tuple[tuple[re.Pattern[str], str], ...], rel: str) -> str | None:
    return next((why for regex, why in patterns if regex.search(rel)), None)


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    return re.compile(pattern) if pattern is not None else None


def _short(rule_name: str) -> str:
    """``layer config f.json: rules[2] (pattern 'x')`` -> ``layer config rules[2] (...)``."""
    _, sep, tail = rule_name.partition(": ")
    return f"layer config {tail}" if sep else rule_name


def _compile_preset(preset: Preset, component: Component) -> _Compiled:
    def pats(items: tuple[Pattern, ...], label: str) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((re.compile(p.regex), f"{label}: {p.why}") for p in items)

    own = f"preset {preset.name}"
    extra_protect = pats(preset.protect, own) if preset is not BASE else ()
    extra_keep = pats(preset.keep, own) if preset is not BASE else ()
    edge = []
    for spec in preset.edge_blocks:
        block = re.compile(rf"^{re.escape(spec.prefix)}\.(\d+)\.")
        rels = (k[len(component.prefix) :] for k in component.keys)
        indices = sorted({int(m.group(1)) for r in rels if (m := block.match(r))})
        chosen = set(indices[: spec.first]) | set(indices[len(indices) - spec.last :])
        if chosen:
            alternatives = "|".join(str(i) for i in sorted(chosen))
            regex = rf"^{re.escape(spec.prefix)}\.(?:{alternatives})\."
            edge.append((re.compile(regex), f"{own}: {spec.why}"))
    return _Compiled(
        protect=(*pats(BASE.protect, "base"), *extra_protect),
        keep=(*pats(BASE.keep, "base"), *extra_keep, *edge),
        drop=pats(preset.drop, own),
        dtype=tuple((re.compile(d.regex), d.dtype, d.why) for d in (*BASE.dtype, *preset.dtype)),
    )
