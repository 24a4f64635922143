"""Methods by name. Each method registers itself in its own file (`@register("lcr")` on its
class, see `fgray.methods.base`); importing this package imports every module in it, so the
registry is complete and adding a method is adding one file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from fgray.config import apply_overrides
from fgray.errors import UserError
from fgray.methods.base import REGISTRY, Method, StepInfo, Suggest, register, unregister

# The built-in methods' files first, in the order studies run them; any other module of this
# package is found and imported after them.
_FIRST = ("moco", "lcr", "sdf", "ppssl", "lodisc")


def _import_method_modules() -> None:
    others = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _FIRST)
    for module in (*_FIRST, *others):
        importlib.import_module(f"{__name__}.{module}")


_import_method_modules()


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_method(name: str, *, backbone: str | None = None, init: str = "random",
                 image_size: int = 224, config: Any = None,
                 overrides: dict[str, Any] | None = None) -> Method:
    """The method `name` on a new backbone, configured by `config` (its typed Config, e.g. a
    RunSpec's `method_config`; None: the defaults) with `overrides` applied on top."""
    from fgray.models.backbone import create_backbone

    cls = method_class(name)
    if config is not None and not isinstance(config, cls.Config):
        raise TypeError(f"config for {name}: expected a {cls.Config.__name__}, got "
                        f"{type(config).__name__}")
    cfg = apply_overrides(config if config is not None else cls.Config(), overrides or {},
                          what=f"{name} setting")
    net = create_backbone(backbone or cls.default_backbone, init=init, img_size=image_size)
    return cls(net, cfg)


__all__ = ["REGISTRY", "Method", "StepInfo", "Suggest", "build_method", "method_class",
           "method_names", "register", "unregister"]
