"""Typed configs as dataclasses, with validation and flat-dict round trips.

Every knob a sweep or `--set section.key=value` may change is a dataclass field; the field's
type drives parsing (once: `split_settings`), and `check_range` keeps range checks next to the
fields they guard. A run's settings come in sections, one dataclass each (the engine names
them: `method.`, `optim.`, `train.`, `aug.`); a bare key is accepted where exactly one section
has that field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from fgray.errors import UserError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    """The annotated type of each dataclass field of `cls`, by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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


def split_settings(sets: Mapping[str, Any], sections: Mapping[str, type], *,
                   owner: str) -> dict[str, dict[str, Any]]:
    """Route settings to their sections, each value parsed to its field's type.

    `sections` maps a section name to its dataclass (`{"method": LCRConfig, "optim": ...}`).
    A key is `section.field`, or a bare `field` that exactly one section has. Unknown keys and
    ambiguous bare keys are one-line user errors naming what would be accepted; `owner` (the
    method) names whose settings they are. Where two keys name the same field the later wins.
    """
    types = {name: _field_types(cls) for name, cls in sections.items()}
    out: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in sets.items():
        section, field = _locate(str(key), value, types, owner)
        out[section][field] = coerce(f"{section}.{field}", value, types[section][field])
    return out


def _locate(key: str, value: Any, types: dict[str, dict[str, Any]],
            owner: str) -> tuple[str, str]:
    """(section, field) of a settings key, or a UserError saying what was expected."""
    every = [f"{s}.{f}" for s, fields in types.items() for f in fields]
    section, dot, field = key.partition(".")
    if dot:
        if section not in types:
            raise UserError(f"unknown setting {key!r} for {owner}: expected a section "
                            f"{', '.join(s + '.' for s in types)} before the name"
                            f"{_did_you_mean(key, every)}")
        if field not in types[section]:
            raise UserError(f"unknown setting {key!r} for {owner}: expected one of "
                            f"{', '.join(f'{section}.{f}' for f in sorted(types[section]))}")
        return section, field
    owners = [s for s, fields in types.items() if key in fields]
    if len(owners) == 1:
        return owners[0], key
    if owners:
        raise UserError(f"--set {key}={value} is ambiguous for {owner}: expected "
                        f"{' or '.join(f'{s}.{key}' for s in owners)}")
    raise UserError(f"unknown setting {key!r} for {owner}: expected SECTION.NAME with SECTION "
                    f"one of {', '.join(types)} and NAME a field of it"
                    f"{_did_you_mean(key, every)}")


def _did_you_mean(key: str, names: list[str]) -> str:
    fields = sorted({n.split(".", 1)[1] for n in names})
    near = difflib.get_close_matches(key.rpartition(".")[2], fields, n=2, cutoff=0.7)
    close = [n for n in names if n.split(".", 1)[1] in near]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def to_dict(cfg: Any) -> dict[str, Any]:
    """A flat JSON-friendly dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(*cfgs: Any) -> str:
    """A short, stable hash of one or more dataclass configs."""
    blob = json.dumps([to_dict(c) for c in cfgs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
