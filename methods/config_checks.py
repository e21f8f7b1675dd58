"""Type and range checks of a method config, before any work is done.

A config value that is not of its field's declared type, or out of a range no run can
use, would otherwise train something else silently: ``epochs=-3`` an untrained model
that is recorded as ``ok``, ``epochs=true`` one epoch. The checks read each field's
annotation (``int``, ``float``, ``bool``, ``str``, ``tuple[...]``, ``X | None``) and a few
naming conventions shared by every config in the suite:

* counts: ``epochs``, ``*_epochs``, ``batch_size``, ``*_batch_size``, ``*steps``,
  ``*timesteps``, ``iterations`` must be integers >= 1 (``warmup_*`` ones >= 0);
* learning rates: ``lr``, ``*_lr`` must be finite and > 0;
* every float must be finite.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

_COUNT = re.compile(r"(^|_)(epochs|batch_size|steps|timesteps|iterations)$")
_RATE = re.compile(r"(^|_)lr$")


class ConfigValueError(ValueError):
    """A config field holds a value of the wrong type or out of range."""


def _allowed_types(annotation: Any) -> tuple[set[type], bool]:
    """The plain types a field accepts and whether it accepts None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: set[type] = set()
        optional = False
        for arg in typing.get_args(annotation):
            if arg is type(None):
                optional = True
            else:
                sub, sub_optional = _allowed_types(arg)
                kinds |= sub
                optional |= sub_optional
        return kinds, optional
    if origin is not None:  # tuple[int, ...], dict[str, Any], ...
        return {origin}, False
    if annotation is Any:
        return {object}, True
    return ({annotation} if isinstance(annotation, type) else {object}), False


def _type_ok(value: Any, kinds: set[type]) -> bool:
    if object in kinds:
        return True
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds
    if isinstance(value, list) and tuple in kinds:
        return True
    return any(isinstance(value, kind) for kind in kinds)


def _type_name(kinds: set[type], optional: bool) -> str:
    names = sorted(k.__name__ for k in kinds)
    return " or ".join(names + (["none"] if optional else []))


def check_config(config: Any) -> None:
    """Raise :class:`ConfigValueError` naming the first field whose value cannot be right."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kinds, optional = _allowed_types(hints.get(f.name, Any))
        if value is None:
            if not optional:
                raise ConfigValueError(f"{f.name}: none is not allowed (expected {_type_name(kinds, optional)})")
            continue
        if not _type_ok(value, kinds):
            raise ConfigValueError(f"{f.name}: expected {_type_name(kinds, optional)}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigValueError(f"{f.name}: must be finite, got {value!r}")
        if _COUNT.search(f.name) and isinstance(value, int) and not isinstance(value, bool):
            least = 0 if f.name.startswith("warmup") else 1
            if value < least:
                raise ConfigValueError(f"{f.name}: must be at least {least}, got {value!r}")
        if _RATE.search(f.name) and isinstance(value, (int, float)) and not value > 0:
            raise ConfigValueError(f"{f.name}: a learning rate must be > 0, got {value!r}")
