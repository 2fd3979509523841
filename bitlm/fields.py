"""Type and range checks shared by every config dataclass: each raises ValueError naming the dotted field."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, Literal


def check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def check_choice(value: Any, name: str, tp: Any) -> None:
    allowed = typing.get_args(tp)
    check(value in allowed, name, f"must be one of {list(allowed)}, got {value!r}")


def check_range(value: int, name: str, low: int, high: int) -> None:
    check(low <= value <= high, name, f"must be in [{low}, {high}], got {value}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(tp: Any) -> str:
    """A declared field type in words: `int`, `int or None`, `one of ['a', 'b']`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def show(value: Any) -> str:
    """A value with its type, as a type error quotes it: `str '64'`, `bool True`, `None`."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return "None" if value is None else f"{type(value).__name__} {text}"


def matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    # bool is a subclass of int: `"batch_size": true` must not train with batch 1
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (bool, str) or dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    return True  # no other annotations occur in configs


def takes_float(tp: Any) -> bool:
    return tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp))


def check_value(value: Any, tp: Any, name: str) -> None:
    """Raise a ValueError naming `name` unless `value` has the declared type `tp`.

    Int fields take ints only (not bools, not 64.0), float fields ints or floats that are finite
    (no field has a use for inf or nan: lr=inf trained to a NaN model), Optional fields None too.
    """
    if typing.get_origin(tp) is Literal:
        check_choice(value, name, tp)
        return
    check(matches(value, tp), name, f"expected {describe(tp)}, got {show(value)}")
    if takes_float(tp) and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            check(math.isfinite(value), name, f"must be finite, got {value}")
        except OverflowError:  # an int too large for a float
            raise ValueError(f"{name}: must be finite, got an int beyond the float range (1.8e308)") from None


def check_fields(cfg: Any, prefix: str) -> None:
    """Type-check every field of a config instance (`prefix` is its section, e.g. "model.")."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        check_value(getattr(cfg, f.name), hints[f.name], prefix + f.name)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
