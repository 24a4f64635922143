"""Per-epoch hooks: `hook(epoch, rank, run_uri, metrics)`, called on every rank after each
training epoch once its checkpoint is written and before it is reported (see
`fgray.train.trainer`). A hook is a callable, a string `package.module:name` each worker
imports, or `{"hook": "package.module:name", "kwargs": {...}}` (JSON, as a stored study holds
it); a malformed or unimportable one is a user error."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fgray.errors import UserError

# hook(epoch, rank, run_uri, metrics), called on every rank after each training epoch.
EpochHook = Callable[[int, int, str, Mapping[str, Any]], None]
# A hook as `build_trainer` takes it: the callable, "package.module:name", or
# {"hook": "package.module:name", "kwargs": {...}} (module docstring).
EpochHookSpec = EpochHook | str | Mapping[str, Any]


def _hook_target(spec: EpochHookSpec) -> tuple[str, str, dict[str, Any]] | None:
    """(module, attribute, keyword arguments) of a hook spec given by name; None for a
    callable; a malformed spec is a UserError."""
    if callable(spec):
        return None
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("hook"), str) \
            and set(spec) <= {"hook", "kwargs"} and isinstance(spec.get("kwargs", {}), Mapping):
        name, kwargs = spec["hook"], dict(spec.get("kwargs", {}))
    else:
        raise UserError(f"epoch hook {spec!r}: expected a callable, 'package.module:name' or "
                        "{'hook': 'package.module:name', 'kwargs': {...}}")
    module, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not module or not attr:
        raise UserError(f"epoch hook {name!r}: expected 'package.module:name'")
    return module, attr, kwargs


def check_epoch_hooks(specs: Sequence[EpochHookSpec]) -> tuple[EpochHookSpec, ...]:
    """`specs` checked for their form (not imported: the workers import them)."""
    specs = tuple(specs or ())
    for spec in specs:
        _hook_target(spec)
    return specs


def load_epoch_hook(spec: EpochHookSpec) -> EpochHook:
    """The callable a hook spec names (imported here); a name that does not import or is
    not callable is a UserError."""
    target_of = _hook_target(spec)
    if target_of is None:
        return spec  # type: ignore[return-value]
    module, attr, kwargs = target_of
    name = f"{module}:{attr}"
    try:
        target: Any = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"epoch hook {name!r}: cannot import it ({exc}); expected an "
                        "importable 'package.module:name' on every worker") from None
    if not callable(target):
        raise UserError(f"epoch hook {name!r}: not callable")
    if not kwargs:
        return target

    def hook(epoch: int, rank: int, run_uri: str, metrics: Mapping[str, Any]) -> None:
        target(epoch, rank, run_uri, metrics, **kwargs)

    return hook


