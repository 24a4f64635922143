"""Typed configs as dataclasses, with validation and flat-dict round trips.

Every knob a sweep or `--set key=value` may change is a dataclass field; the field's type
drives parsing, and `check_range` keeps range checks next to the fields they guard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from fgray.errors import UserError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert `value` (often a string from the command line) to the annotated type `tp`."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise UserError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(name, value, args[0])
    if origin in (tuple, list):
        (inner, *_) = get_args(tp) or (str,)
        items = value.split(",") if isinstance(value, str) else list(value)
        out = [coerce(name, v, inner) for v in items]
        return tuple(out) if origin is tuple else out
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():
                return int(float(value))
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r}: expected a {tp.__name__}") from None
    return value


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a one-line UserError when `value` lies outside [lo, hi] (or the open variants)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise UserError(f"{name}={value!r} is out of range: expected {left}{lo_s}, {hi_s}{right}")


def apply_overrides(cfg: T, overrides: dict[str, Any], *, what: str = "setting") -> T:
    """Return a copy of dataclass `cfg` with `overrides` applied, each parsed to its field type.

    Unknown keys are user errors that list the valid ones. `validate()` runs on the result
    when the dataclass defines it.
    """
    types = _field_types(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise UserError(
                f"unknown {what} {key!r}: expected one of {', '.join(sorted(names))}")
        changes[key] = coerce(key, value, types[key])
    out = dataclasses.replace(cfg, **changes)
    validate = getattr(out, "validate", None)
    if callable(validate):
        validate()
    return out


def parse_set_flags(pairs: list[str] | None) -> dict[str, str]:
    """Parse repeated `--set key=value` flags into a dict (the values stay strings)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A flat JSON-friendly dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a dict, ignoring keys it does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    return apply_overrides(cls(), {k: v for k, v in data.items() if k in names})


def config_hash(*cfgs: Any) -> str:
    """A short, stable hash of one or more dataclass configs."""
    blob = json.dumps([to_dict(c) for c in cfgs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
