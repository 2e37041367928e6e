"""Per-layer rules from a JSON file (``--layer-config``): schema, validation, template.

Schema (every key optional except ``rules[i].pattern``)::

    {
      "_comment": "free text or a list of lines",
      "fullmatch": false,
      "_default": {"format": "int8", "scaling": "row"},
      "rules": [
        {"pattern": "final_layer", "skip": true},
        {"pattern": "attn\\\\.qkv", "format": "fp8", "rounding": "learned"},
        {"pattern": "mlp", "format": "int8_blockwise", "block_size": 64, "_comment": "..."}
      ]
    }

Rules are tried in file order; the first whose ``pattern`` matches the *layer name* (the key
without ``.weight``, prefixes included) decides: ``skip`` keeps the layer, otherwise it gets the
rule's format. ``re.search`` is used, or ``re.fullmatch`` with ``"fullmatch": true`` /
``--fullmatch``. Layers no rule matches get ``_default`` (itself a rule without a pattern), or
the primary format of the command line. Omitted ``scaling``/``block_size``/``rounding`` are
inherited from ``_default``, then from the command line.

``format`` is ``fp8`` or ``int8`` (scaling from ``scaling``) or a ComfyUI format name:
``float8_e4m3fn`` (tensor), ``float8_e4m3fn_rowwise``, ``float8_e4m3fn_blockwise``,
``int8_tensorwise`` (tensor, or ``"scaling": "row"``), ``int8_blockwise``. Any other name is an
error naming the rule, before any work: formats we cannot write are never replaced silently.
Everything is validated when the file is loaded; errors name the file and the rule.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .formats import Format, Kind, Scaling

# name -> (kind, scaling it implies; None: any of tensor/row)
FORMAT_NAMES: Mapping[str, tuple[Kind, Scaling | None]] = {
    "fp8": (Kind.FP8, None),
    "int8": (Kind.INT8, None),
    "float8_e4m3fn": (Kind.FP8, Scaling.TENSOR),
    "float8_e4m3fn_rowwise": (Kind.FP8, Scaling.ROW),
    "float8_e4m3fn_blockwise": (Kind.FP8, Scaling.BLOCK),
    "int8_tensorwise": (Kind.INT8, None),
    "int8_blockwise": (Kind.INT8, Scaling.BLOCK),
}
# Names other tools write that this pack cannot (yet): rejected with a precise message.
UNWRITABLE_FORMATS = (
    "float8_e5m2", "mxfp8", "nvfp4", "hybrid_mxfp8", "svdquant_w4a4", "float8_e4m3fn_block3d",
    "int4", "nf4", "fp4", "gguf",
)  # fmt: skip
SCALINGS = tuple(s.value for s in Scaling)
_RULE_KEYS = ("pattern", "format", "scaling", "block_size", "rounding", "skip", "_comment")
_TOP_KEYS = ("rules", "_default", "fullmatch", "_comment")


@dataclass(frozen=True)
class FormatSpec:
    """A validated but not yet resolved format request: omitted fields are ``None``."""

    kind: Kind | None = None
    scaling: Scaling | None = None
    block_size: int | None = None
    where: str = ""

    def resolve(self, inherit: Format) -> Format:
        """Fill omitted fields from ``inherit`` (the format one level up)."""
        kind = self.kind or inherit.kind
        scaling = self.scaling or inherit.scaling
        if self.block_size is not None and scaling is not Scaling.BLOCK:
            raise ConfigError(
                f"{self.where}: block_size {self.block_size} needs block scaling, but the "
                f"inherited scaling is {scaling.value!r}; set the scaling explicitly"
            )
        block = self.block_size or inherit.block_size or 128
        return Format(kind, scaling, block if scaling is Scaling.BLOCK else None)


def parse_format(
    name: object,
    *,
    scaling: object = None,
    block_size: object = None,
    where: str,
) -> FormatSpec:
    """Validate a format request; ``where`` names the rule or option in errors.

    A scaling neither the name nor ``scaling`` fixes stays ``None`` (inherited later). Raises
    :class:`ConfigError` for any name we cannot write.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: format must be a non-empty string, got {name!r}")
    if name not in FORMAT_NAMES:
        writable = ", ".join(FORMAT_NAMES)
        if name in UNWRITABLE_FORMATS:
            raise ConfigError(
                f"{where}: format {name!r} cannot be written by comfyui-quantizer; "
                f"use one of {writable}"
            )
        raise ConfigError(f"{where}: unknown format {name!r}; use one of {writable}")
    kind, implied = FORMAT_NAMES[name]
    chosen: Scaling | None = None
    if scaling is not None:
        if scaling not in SCALINGS:
            raise ConfigError(
                f"{where}: unknown scaling {scaling!r}; use one of {', '.join(SCALINGS)}"
            )
        chosen = Scaling(scaling)
        allowed = (Scaling.TENSOR, Scaling.ROW) if name == "int8_tensorwise" else (implied,)
        if (implied is not None or name == "int8_tensorwise") and chosen not in allowed:
            raise ConfigError(
                f"{where}: format {name!r} cannot use scaling {chosen.value!r}; "
                f"use {kind.value!r} with that scaling instead"
            )
    resolved = chosen or implied
    if resolved is None and name == "int8_tensorwise":
        resolved = Scaling.TENSOR
    if block_size is not None:
        if not isinstance(block_size, int) or isinstance(block_size, bool):
            raise ConfigError(f"{where}: block_size must be an integer, got {block_size!r}")
        if not 1 <= block_size <= 4096:
            raise ConfigError(f"{where}: block_size must be between 1 and 4096, got {block_size}")
        if resolved is not None and resolved is not Scaling.BLOCK:
            raise ConfigError(
                f"{where}: block_size only applies to block scaling, not {resolved.value!r}"
            )
    return FormatSpec(kind, resolved, block_size, where)


@dataclass(frozen=True)
class LayerRule:
    """One validated rule. ``pattern`` is ``None`` for ``_default``."""

    name: str
    pattern: str | None
    skip: bool = False
    spec: FormatSpec | None = None
    rounding: str | None = None

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        """``pattern`` compiled once (validated by ``_parse_rule``; ``_default`` never matches)."""
        return re.compile(self.pattern)

    def matches(self, layer: str, *, fullmatch: bool) -> bool:
        regex = self.regex
        return bool(regex.fullmatch(layer) if fullmatch else regex.search(layer))


@dataclass(frozen=True)
class LayerConfig:
    """A validated layer-config file."""

    origin: str
    rules: tuple[LayerRule, ...]
    default: LayerRule | None = None
    fullmatch: bool = False

    def first_match(self, layer: str, *, fullmatch: bool = False) -> LayerRule | None:
        """The first rule whose pattern matches ``layer`` (``_default`` is not considered)."""
        full = fullmatch or self.fullmatch
        return next((r for r in self.rules if r.matches(layer, fullmatch=full)), None)


def load_layer_config(path: str | Path) -> LayerConfig:
    """Read and validate a layer-config JSON file; :class:`ConfigError` names the rule."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"layer config {path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"layer config {path}: not valid JSON ({e})") from None
    return parse_layer_config(data, origin=str(path))


def parse_layer_config(data: object, *, origin: str = "<layer config>") -> LayerConfig:
    """Validate the decoded JSON of a layer config."""
    where = f"layer config {origin}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object with a 'rules' list")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(_TOP_KEYS)}"
        )
    fullmatch = data.get("fullmatch", False)
    if not isinstance(fullmatch, bool):
        raise ConfigError(f"{where}: 'fullmatch' must be true or false")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}: 'rules' must be a list of objects")
    rules = tuple(
        _parse_rule(raw, name=f"{where}: rules[{i}]", needs_pattern=True)
        for i, raw in enumerate(raw_rules)
    )
    default = None
    if "_default" in data:
        default = _parse_rule(data["_default"], name=f"{where}: _default", needs_pattern=False)
    return LayerConfig(origin, rules, default, fullmatch)


def _parse_rule(raw: object, *, name: str, needs_pattern: bool) -> LayerRule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: must be an object, got {type(raw).__name__}")
    pattern = raw.get("pattern")
    if needs_pattern:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{name}: needs a non-empty 'pattern' (a regular expression)")
        name = f"{name} (pattern {pattern!r})"
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{name}: invalid regular expression: {e}") from None
    elif pattern is not None:
        raise ConfigError(f"{name}: _default takes no 'pattern'")
    allowed = _RULE_KEYS if needs_pattern else tuple(k for k in _RULE_KEYS if k != "pattern")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
    skip = raw.get("skip", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"{name}: 'skip' must be true or false")
    fields = [k for k in ("format", "scaling", "block_size", "rounding") if k in raw]
    if skip:
        if fields:
            raise ConfigError(f"{name}: a 'skip' rule cannot also set {fields[0]!r}")
        return LayerRule(name, pattern, skip=True)
    if "format" not in raw and needs_pattern:
        raise ConfigError(f"{name}: needs 'format' (or \"skip\": true)")
    spec = None
    if "format" in raw:
        spec = parse_format(
            raw["format"], scaling=raw.get("scaling"), block_size=raw.get("block_size"), where=name
        )
    elif "scaling" in raw or "block_size" in raw:
        raise ConfigError(f"{name}: 'scaling'/'block_size' need a 'format'")
    rounding = raw.get("rounding")
    if rounding is not None:
        from .config import ROUNDINGS  # config imports this package's rules; import late

        if rounding not in ROUNDINGS:
            raise ConfigError(
                f"{name}: unknown rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}"
            )
    return LayerRule(name, pattern, spec=spec, rounding=rounding)


@dataclass(frozen=True)
class TemplateLayer:
    """A layer a template may set: its name, shape and what the current plan does with it."""

    layer: str
    shape: tuple[int, ...]
    fmt: Format | None  # None: stays in high precision
    rounding: str
    reason: str


def family_pattern(layer: str) -> str:
    """``double_blocks.7.img_mlp.0`` -> ``^double_blocks\\.\\d+\\.img_mlp\\.0$``.

    Only the first number is folded: it is the block index; later numbers index layers inside
    a block (``img_mlp.0`` and ``img_mlp.2`` are different layers with different shapes).
    """
    parts = layer.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    escaped = [r"\d+" if i == first else re.escape(p) for i, p in enumerate(parts)]
    return "^" + r"\.".join(escaped) + "$"


def template(
    layers: Sequence[TemplateLayer],
    *,
    primary: Format,
    rounding: str,
    header: Sequence[str],
) -> dict[str, object]:
    """A layer config with one commented rule per layer family, equivalent to the current plan.

    Family members that the plan treats differently from the family's majority get exact
    rules before the family rule, so that applying the template unchanged gives the same plan.
    """
    families: dict[str, list[TemplateLayer]] = {}
    for t in layers:
        families.setdefault(family_pattern(t.layer), []).append(t)
    rules: list[dict[str, object]] = []
    for pattern, members in families.items():
        by_choice: dict[tuple[object, ...], list[TemplateLayer]] = {}
        for m in members:
            by_choice.setdefault(_choice(m), []).append(m)
        # Ties go to the quantized choice: the exceptions of a family are usually its keeps.
        majority = max(by_choice.values(), key=lambda g: (len(g), g[0].fmt is not None))
        for group in by_choice.values():
            if group is majority:
                continue
            for m in group:
                rules.append(_rule("^" + re.escape(m.layer) + "$", [m], exception=True))
        rules.append(_rule(pattern, majority, total=len(members)))
    default: dict[str, object] = {**_format_fields(primary), "rounding": rounding}
    return {"_comment": list(header), "_default": default, "rules": rules}


def _choice(t: TemplateLayer) -> tuple[object, ...]:
    return ("skip",) if t.fmt is None else (t.fmt.label, t.rounding)


def _format_fields(fmt: Format) -> dict[str, object]:
    out: dict[str, object] = {"format": fmt.kind.value, "scaling": fmt.scaling.value}
    if fmt.scaling is Scaling.BLOCK:
        out["block_size"] = fmt.block_size
    return out


def _rule(
    pattern: str, group: list[TemplateLayer], *, total: int = 0, exception: bool = False
) -> dict[str, object]:
    first = group[0]
    shape = "x".join(map(str, first.shape))
    count = f"{len(group)} of {total} layers" if total > len(group) else f"{len(group)} layer(s)"
    what = "exception to its family; " if exception else ""
    if first.fmt is None:
        planned = f"kept: {first.reason}"
    else:
        planned = f"planned {first.fmt.label}" + (f" ({first.reason})" if first.reason else "")
    comment = f"{what}{count}, e.g. {first.layer} [{shape}]; {planned}"
    rule: dict[str, object] = {"_comment": comment, "pattern": pattern}
    if first.fmt is None:
        rule["skip"] = True
    else:
        rule.update(_format_fields(first.fmt))
        rule["rounding"] = first.rounding
    return rule
