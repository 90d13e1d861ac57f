"""Checks of JSON-able values as they arrive from a user or a client: integers, finite numbers, and the fields
of a settings dataclass (``MedSAMSettings`` from model options, ``RefineSettings`` from a server's session
options)."""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_fields(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Each of ``values`` (fields of the dataclass ``cls``, known ones) fits its field's type: ``float`` (any
    finite number), ``int``, ``bool``, ``str``, a list or tuple of numbers (of integers for ``int`` items), or
    ``None`` where the field allows it. ``ValueError`` naming the first that does not, as ``{what} 'key'``."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        fine, expected = _fits(value, hints[key])
        if not fine:
            if value is None:
                raise ValueError(f"{what} {key!r} may not be null")
            raise ValueError(f"{what} {key!r} must be {expected}, got {value!r}")


def _fits(value: Any, hint: Any) -> tuple[bool, str]:
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return True, "null"
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        integers = bool(args) and args[0] is int
        item = is_int if integers else is_number
        return (isinstance(value, (list, tuple)) and all(item(v) for v in value),
                f"a list of {'integers' if integers else 'numbers'}")
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return is_int(value), "an integer"
    if hint is float:
        return is_number(value), "a number"
    return isinstance(value, hint), getattr(hint, "__name__", str(hint))
