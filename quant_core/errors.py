"""Errors a user can cause. Each message names the file and, where there is one, the layer."""

from __future__ import annotations


class QuantError(Exception):
    """Base class of every error the pack reports to a user as one line."""


class InputError(QuantError):
    """The input model is unreadable, malformed or not something we can quantize."""


class ConfigError(QuantError):
    """An option, preset or layer rule is invalid; raised before any work starts."""


class OutputError(QuantError):
    """The output path cannot be written as asked (exists, equals the input, ...)."""


class Cancelled(QuantError):  # noqa: N818 - reads better at call sites
    """The caller's cancel check returned True; no output file was left behind."""


def at(path: object, layer: str | None = None) -> str:
    """Format the location prefix of an error message: ``file`` or ``file: layer``."""
    return f"{path}: {layer}" if layer else f"{path}"
