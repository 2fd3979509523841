"""Dotted-key overrides (`--set model.n_layers=8`): parse each value as its field's type, apply them section by section."""

from __future__ import annotations

import dataclasses
import decimal
import types
import typing
from typing import Any, Literal

from .fields import check, check_value, field_types
from .renames import current_key


def _coerce(value: str, tp: Any, key: str) -> Any:
    """Parse a command-line string into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        return value
    if tp is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        return _parse_int(value, key)
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}: expected float, got {value!r}") from None
    return value


def _parse_int(text: str, key: str) -> int:
    """An int parsed exactly: "2305843009213693953" or an integral "1e3", never through a float.

    A float holds 53 bits, so int(float(text)) turned a seed of 2**60 + 1 into 2**60.
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError(f"{key}: expected int, got {text!r}") from None
    check(number.is_finite() and number == number.to_integral_value(), key, f"expected int, got {text!r}")
    # building the int of "1e999999999" would take minutes and gigabytes; no field comes near 100 digits
    check(number.adjusted() < 100, key, f"{text!r} is out of range")
    return int(number)


def apply_overrides(cfg: Any, assignments: list[str] | tuple[str, ...]) -> Any:
    """Return `cfg` with `key.sub=value` assignments applied (validated by the dataclasses).

    The last assignment to a key wins. Every section is rebuilt once with all of its assignments,
    so checks across fields see the final values whatever the order: train.context_bytes=512 may
    come before the model.max_positions that makes room for it.
    """
    changes: dict[str, Any] = {}
    given: dict[str, str] = {}  # current key -> the old key an assignment used (errors name what was written)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. model.n_layers=8")
        key, value = (part.strip() for part in item.split("=", 1))
        if current_key(key) != key:  # a key renamed or moved since (bitlm.renames)
            given[current_key(key)] = key
            key = current_key(key)
        path = key.split(".")
        tp = _field_type(cfg, path, key)
        shown = given.get(key, key)
        coerced = _coerce(value, tp, shown)
        check_value(coerced, tp, shown)
        node = changes
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = coerced
    if not changes:
        return cfg
    try:
        return _replace_nested(cfg, changes)
    except ValueError as err:
        text = str(err)
        for key, old in given.items():
            if text.startswith(f"{key}:"):
                raise ValueError(f"{old}{text[len(key):]} ({old} is now {key})") from None
        raise


def _field_type(cfg: Any, path: list[str], full_key: str) -> Any:
    """The declared type of the scalar field that `path` names in `cfg`."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if path[0] not in names:
        raise ValueError(f"override {full_key!r}: {type(cfg).__name__} has no field {path[0]!r}; "
                         f"known: {sorted(names)}")
    current = getattr(cfg, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"override {full_key!r}: {path[0]!r} is not a config section")
        return _field_type(current, path[1:], full_key)
    if dataclasses.is_dataclass(current):
        raise ValueError(f"override {full_key!r}: {path[0]!r} is a section; set one of its fields")
    return field_types(type(cfg))[path[0]]


def _replace_nested(cfg: Any, changes: dict[str, Any]) -> Any:
    # a dict in `changes` is a section's assignments: field values are never dicts
    return dataclasses.replace(cfg, **{
        name: _replace_nested(getattr(cfg, name), sub) if isinstance(sub, dict) else sub
        for name, sub in changes.items()})
