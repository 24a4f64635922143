"""Methods by name. Each is one file; the registry imports it only when asked for."""

from __future__ import annotations

import importlib
from typing import Any

from fgray.config import apply_overrides
from fgray.errors import UserError
from fgray.methods.base import Method, StepInfo

REGISTRY = {
    "moco": "fgray.methods.moco:MoCoV2",
    "mocov3": "fgray.methods.moco:MoCoV3",
    "lcr": "fgray.methods.lcr:LCR",
    "lodisc": "fgray.methods.lodisc:LoDisc",
    "sdf": "fgray.methods.sdf:SDF",
    "ppssl": "fgray.methods.ppssl:PPSSL",
}


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}: expected one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def method_config(name: str, overrides: dict[str, Any] | None = None):
    """The method's config dataclass with `overrides` parsed and validated."""
    return apply_overrides(method_class(name).Config(), overrides or {},
                           what=f"{name} setting")


def build_method(name: str, *, backbone: str | None = None, init: str = "random",
                 image_size: int = 224, overrides: dict[str, Any] | None = None) -> Method:
    from fgray.models.backbone import create_backbone

    cls = method_class(name)
    cfg = method_config(name, overrides)
    net = create_backbone(backbone or cls.default_backbone, init=init, img_size=image_size)
    return cls(net, cfg)


__all__ = ["REGISTRY", "Method", "StepInfo", "build_method", "method_class", "method_config"]
