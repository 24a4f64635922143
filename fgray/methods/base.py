"""The uniform surface every method offers the engine.

The engine calls these and never asks which method it holds:

- `forward(view1, view2, step) -> dict`: the total under "loss" (with grad) and every named
  term (detached) — the engine backpropagates the total and logs the rest;
- `embed(images) -> features`: the test-time feature used by retrieval, kNN and the probe;
- `param_groups() -> list[dict]`: what the optimiser trains;
- `momentum_update(progress)`: after each optimiser step (EMA encoders; a no-op otherwise);
- `spatial_maps(images) -> dict[str, Tensor]`: the maps a method relies on, (B, h, w), for
  TensorBoard and the localisation score;
- `pair_images(images) -> dict[str, (Tensor, Tensor)]`: named pairs of [0, 1] images a
  method produces from its input (SDF's decoded D(z) and D(z')), shown side by side.

Each method declares a `Config` dataclass holding the knobs a sweep may search, and class
attributes for its defaults (backbone, augmentation recipe, optimiser settings). A Config field
whose recipe value depends on the backbone family defaults to None and is filled in by
`family_defaults` (MoCo v3's temperature: 0.2 for ViTs, 1.0 for ResNets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn


@dataclass(frozen=True)
class StepInfo:
    epoch: int  # 0-based epoch being trained
    step: int  # global optimiser step
    progress: float  # fraction of training done, in [0, 1)
    epochs: int = 1  # total epochs of the run


class Method(nn.Module):
    Config: ClassVar[type]
    default_backbone: ClassVar[str] = "resnet50"
    augment_preset: ClassVar[str] = "mocov2"
    # OptimConfig field overrides: the recipe of the paper the method follows.
    optim_defaults: ClassVar[dict[str, Any]] = {}
    sync_bn: ClassVar[bool] = False

    @classmethod
    def family_defaults(cls, is_vit: bool) -> dict[str, Any]:
        """Recipe values of the Config fields that default to None because they depend on the
        backbone family (ViT or CNN); none by default."""
        return {}

    @classmethod
    def resolve_config(cls, cfg: Any, is_vit: bool) -> Any:
        """`cfg` with each None field of `family_defaults` given its recipe value. Methods
        call it when built; the search space calls it for its recipe point."""
        fill = {k: v for k, v in cls.family_defaults(is_vit).items() if getattr(cfg, k) is None}
        return dataclasses.replace(cfg, **fill) if fill else cfg

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        raise NotImplementedError

    def embed(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def momentum_update(self, progress: float) -> None:
        """EMA update of momentum encoders after an optimiser step; methods without one
        keep this default."""

    def spatial_maps(self, images: Tensor) -> dict[str, Tensor]:
        """Methods with no spatial map of their own return none."""
        return {}

    def pair_images(self, images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Methods that synthesise no images return none."""
        return {}
