"""Type checks of config values against the config dataclass's annotations, before any value is used.

Configs come from specs and from untrusted checkpoint files, so a string where a number belongs, a list where a
string belongs or a NaN must fail as a UserError naming the field — not later as a TypeError inside a
comparison. Numbers are lenient in one way: a field annotated `int` or `float` takes any finite real number
(`alpha: 8.0` is fine); a method's own `validate` then applies stricter rules where it needs them (`r` must
be an integer).
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from ..errors import UserError


def check_values(config_class: type, values: dict[str, Any], path: str) -> None:
    """UserError `path.field: expected ..., got ...` for the first value that does not fit its annotation."""
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        expected = hints.get(key)
        if expected is None or typing.get_origin(expected) is typing.ClassVar:
            continue
        if not fits(value, expected):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{path}.{key}: expected {describe(expected)}, got {shown}.")


def fits(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected in (int, float):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if expected is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(fits(item, args[0]) for item in value)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
    return isinstance(value, expected) if isinstance(expected, type) else True


def describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if expected is type(None):
        return "null"
    if expected in (int, float):
        return "a finite number"
    if expected is bool:
        return "true or false"
    if expected is str:
        return "a string"
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"an object of {describe(args[1]).removeprefix('a ')}s"
    return getattr(expected, "__name__", str(expected))
