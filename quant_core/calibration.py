"""Calibration statistics: what each linear layer's inputs look like, gathered from real forwards.

Learned rounding minimises the output error ``E‖X·(W − Ŵ)ᵀ‖²`` of a layer, which depends on its
inputs ``X [n, in]`` only through the second moment ``H = XᵀX / n [in, in]``; bias correction
needs the mean ``μ = Σx / n [in]`` and a calibrated FP8 ``input_scale`` needs ``max |x|``. The
recorder gathers exactly these, keyed by the layer's own state-dict weight name::

    from comfyui_quantizer.quant_core.calibration import CalibrationRecorder

    with CalibrationRecorder(model) as rec:
        for batch in batches:
            model(batch)
    rec.save("calibration.safetensors")

Each input row goes, by a seeded draw, either to the *fit* statistics (what the optimiser sees)
or to the *check* statistics (``holdout`` of the rows) that the guard uses to decide whether the
learned codes really beat round-to-nearest on data they were not fitted to.

Layers wider than ``sketch_above`` inputs keep a bounded-memory sketch instead of the dense
``[in, in]`` matrix: a Frequent-Directions sketch ``B [k, in]`` (``BᵀB ⪯ XᵀX``, error at most
``‖X‖²_F / (k/2)`` in spectral norm) plus the exact diagonal, so that the reconstructed matrix is
exact on the diagonal and under-estimates only off-diagonal correlations.

File layout (safetensors, F32 unless noted), for a weight key ``K`` and part ``P`` in
``fit``/``check``: ``K/P/second_moment [in, in]`` (dense) or ``K/P/sketch [k, in]`` +
``K/P/diag [in]`` (sketch, unnormalised sums), ``K/P/mean [in]``, ``K/P/absmax []``,
``K/P/count []`` (I64). The header's ``format`` entry is ``comfyui_quantizer.calibration``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, InputError
from .learned import matmul_precision

FILE_FORMAT = "comfyui_quantizer.calibration"
FILE_VERSION = "1"
PARTS = ("fit", "check")


@dataclass(frozen=True)
class Moments:
    """Input statistics of one layer over ``count`` rows ``x [in]``.

    ``second_moment`` is ``E[x xᵀ] [in, in]`` (float32), ``mean`` is ``E[x] [in]``, ``absmax``
    is ``max |x|`` (a 0-dim tensor), ``sketched`` says the matrix came from a sketch.
    """

    second_moment: torch.Tensor
    mean: torch.Tensor
    absmax: torch.Tensor
    count: int
    sketched: bool = False

    @property
    def covariance(self) -> torch.Tensor:
        """``E[(x − μ)(x − μ)ᵀ] [in, in]``: what remains after bias correction."""
        return self.second_moment - torch.outer(self.mean, self.mean)

    def to(self, device: torch.device | str) -> Moments:
        return Moments(
            self.second_moment.to(device),
            self.mean.to(device),
            self.absmax.to(device),
            self.count,
            self.sketched,
        )


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one layer: ``fit`` (for the optimiser) and ``check`` (for the guard)."""

    fit: Moments
    check: Moments | None

    @property
    def in_features(self) -> int:
        return int(self.fit.mean.shape[0])

    @property
    def absmax(self) -> torch.Tensor:
        """Largest input magnitude seen in any row (fit or check), 0-dim float32."""
        if self.check is None:
            return self.fit.absmax
        return torch.maximum(self.fit.absmax, self.check.absmax)

    def to(self, device: torch.device | str) -> LayerStats:
        return LayerStats(
            self.fit.to(device), None if self.check is None else self.check.to(device)
        )


class _Sums:
    """Running ``Σ x``, ``max |x|`` and row count of float32 rows (on the input's device)."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.absmax = torch.zeros((), dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        self.total += x.sum(0, dtype=torch.float64)
        self.absmax = torch.maximum(self.absmax, x.abs().amax())
        self.count += x.shape[0]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            prefix + "mean": (self.total / max(self.count, 1)).float().cpu(),
            prefix + "absmax": self.absmax.reshape(()).float().cpu(),
            prefix + "count": torch.tensor(self.count, dtype=torch.int64),
        }


class _DenseSums(_Sums):
    """Plus the dense ``Σ x xᵀ [in, in]`` (float32)."""

    def __init__(self, features: int, device: torch.device) -> None:
        super().__init__(features, device)
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        super().add(x)
        self.xtx.addmm_(x.T, x)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        n = max(self.count, 1)
        return {prefix + "second_moment": (self.xtx / n).cpu(), **super().tensors(prefix)}


class _SketchSums(_Sums):
    """Plus a Frequent-Directions sketch ``B [rank, in]`` (``BᵀB ⪯ Σ x xᵀ``) and the exact diagonal.

    Rows are buffered up to ``2·rank``; then the buffer is shrunk to ``rank`` rows by an SVD
    whose squared singular values are reduced by the ``rank``-th one (Liberty 2013).
    """

    def __init__(self, features: int, device: torch.device, rank: int) -> None:
        super().__init__(features, device)
        self.rank = rank
        self.buffer = torch.zeros(0, features, dtype=torch.float32, device=device)
        self.diag = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        super().add(x)
        self.diag += (x.double() ** 2).sum(0)
        for chunk in x.split(self.rank):
            self.buffer = torch.cat([self.buffer, chunk])
            if self.buffer.shape[0] >= 2 * self.rank:
                self._shrink()

    def _shrink(self) -> None:
        _, s, vh = torch.linalg.svd(self.buffer.double(), full_matrices=False)
        keep = min(self.rank, s.shape[0])
        delta = s[keep - 1] ** 2
        s_new = (s[:keep] ** 2 - delta).clamp_min(0).sqrt()
        self.buffer = (s_new[:, None] * vh[:keep]).float()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            prefix + "sketch": self.buffer.cpu().contiguous(),
            prefix + "diag": self.diag.float().cpu(),
            **super().tensors(prefix),
        }


class CalibrationRecorder:
    """Context manager that records the inputs of every ``nn.Linear`` of ``module``.

    Keys are the weight names of ``module.state_dict()`` (``blocks.0.attn.qkv.weight``).
    ``holdout`` is the fraction of input rows kept apart for the guard (0 disables it);
    ``sketch_above`` is the input width above which a rank-``sketch_rank`` sketch replaces the
    dense ``[in, in]`` matrix (memory ``≈ 3·rank·in`` floats instead of ``in²``); ``seed`` fixes
    which rows are held out. Conv layers are not recorded: only 2-D linear weights are quantized.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        holdout: float = 0.25,
        sketch_above: int = 8192,
        sketch_rank: int = 512,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
        if sketch_rank < 1 or sketch_above < 1:
            raise ConfigError("sketch_rank and sketch_above must be positive")
        self.module = module
        self.holdout = holdout
        self.sketch_above = sketch_above
        self.sketch_rank = sketch_rank
        self.seed = seed
        self._layers = {
            (f"{name}.weight" if name else "weight"): mod
            for name, mod in module.named_modules()
            if isinstance(mod, nn.Linear)
        }
        self._sums: dict[str, dict[str, _Sums]] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> CalibrationRecorder:
        for i, (key, mod) in enumerate(self._layers.items()):
            self._generators[key] = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            self._handles.append(mod.register_forward_pre_hook(self._hook(key)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, key: str):
        def record(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            self._add(key, x.reshape(-1, x.shape[-1]).float())

        return record

    @torch.no_grad()
    def _add(self, key: str, x: torch.Tensor) -> None:
        sums = self._sums.get(key)
        if sums is None:
            features = x.shape[1]

            def make() -> _Sums:
                if features > self.sketch_above:
                    return _SketchSums(features, x.device, self.sketch_rank)
                return _DenseSums(features, x.device)

            sums = self._sums[key] = {part: make() for part in PARTS}
        # The draw is on the CPU so that the split does not depend on the device.
        held = torch.rand(x.shape[0], generator=self._generators[key]) < self.holdout
        held = held.to(x.device)
        # highest precision: TF32 would blur the small correlations the objective relies on
        with matmul_precision("highest", x.device):
            sums["fit"].add(x[~held])
            sums["check"].add(x[held])

    def keys(self) -> list[str]:
        """Weight keys of every recorded layer (those whose forward ran at least once)."""
        return list(self._sums)

    def stats(self) -> dict[str, LayerStats]:
        """Recorded statistics, keyed by weight name, on the CPU."""
        return _parse(self.tensors())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The flat ``{name: tensor}`` written by :meth:`save`."""
        out: dict[str, torch.Tensor] = {}
        for key, sums in self._sums.items():
            for part in PARTS:
                if part == "check" and sums[part].count == 0:
                    continue
                out.update(sums[part].tensors(f"{key}/{part}/"))
        return out

    def save(self, path: str | Path) -> None:
        """Write the statistics to a safetensors file (see the module docstring for names)."""
        from safetensors.torch import save_file

        if not self._sums:
            raise InputError(f"{path}: nothing recorded; run the module inside the recorder")
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION}
        save_file(self.tensors(), str(path), metadata=meta)


class CalibrationFile:
    """Lazy reader of a calibration file: the header on open, one layer per :meth:`get`."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as e:  # safetensors raises several types for a bad file
            raise InputError(f"{self.path}: not a readable calibration file ({e})") from None
        meta = self._file.metadata() or {}
        if meta.get("format") != FILE_FORMAT:
            raise InputError(
                f"{self.path}: not a calibration file (header format {meta.get('format')!r}); "
                "write one with CalibrationRecorder.save"
            )
        self._names: dict[str, list[str]] = {}  # weight key -> its tensors' names
        for name in self._file.keys():  # noqa: SIM118 (safe_open is no mapping)
            self._names.setdefault(_layer_key(name), []).append(name)
        self._keys = sorted(self._names)

    def keys(self) -> list[str]:
        """Weight keys the file has statistics for."""
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def get(self, key: str) -> LayerStats | None:
        """Statistics of weight ``key`` (CPU, float32), or None if the file has none."""
        names = self._names.get(key)
        if names is None:
            return None
        return _parse({n: self._file.get_tensor(n) for n in names})[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)


def match_keys(weights: list[str], calibration: list[str]) -> dict[str, str]:
    """Map model weight keys to calibration keys: equal, or one a dotted suffix of the other.

    A checkpoint often prefixes the module's names (``model.diffusion_model.`` + ``blocks.0...``);
    a suffix match is taken only when it is unique.
    """
    known = set(calibration)
    by_suffix: dict[str, list[str]] = {}
    for key in calibration:
        parts = key.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(key)
    out: dict[str, str] = {}
    for w in weights:
        if w in known:
            out[w] = w
            continue
        parts = w.split(".")
        # the weight key is prefixed: its longest suffix that is a calibration key
        hits = [".".join(parts[i:]) for i in range(1, len(parts)) if ".".join(parts[i:]) in known]
        if hits:
            out[w] = hits[0]
            continue
        # the calibration key is prefixed: it must be the only one ending in the weight key
        longer = by_suffix.get(w, [])
        if len(longer) == 1:
            out[w] = longer[0]
    return out


def _layer_key(name: str) -> str:
    """``K/part/field`` -> ``K`` (the weight key, which may itself hold a ``/``)."""
    return name.rsplit("/", 2)[0]


def _parse(tensors: dict[str, torch.Tensor]) -> dict[str, LayerStats]:
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        key, part, field = name.rsplit("/", 2)
        grouped.setdefault(key, {}).setdefault(part, {})[field] = t
    out = {}
    for key, parts in grouped.items():
        check = parts.get("check")
        out[key] = LayerStats(_moments(parts["fit"]), _moments(check) if check else None)
    return out


def _moments(t: dict[str, torch.Tensor]) -> Moments:
    count = int(t["count"])
    n = max(count, 1)
    sketched = "sketch" in t
    if sketched:
        b = t["sketch"].double()
        low_rank = b.T @ b
        # add back the diagonal mass the sketch dropped, so that diag(H) is exact
        missing = (t["diag"].double() - torch.diagonal(low_rank)).clamp_min(0)
        second = ((low_rank + torch.diag(missing)) / n).float()
    else:
        second = t["second_moment"].float()
    return Moments(second, t["mean"].float(), t["absmax"].float(), count, sketched)
