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

A method registers once, in its own file, with `@register("name")` on its class; the class
carries everything the rest of fgray asks of it: `Config`, `default_backbone`, its search space
(`search_space`, define-by-run, whose defaults are the paper's point) and the `structural`
knobs of that space that steer it but are no Config field. The CLI's choices, the presets'
method lists and the study's search spaces read the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from torch import Tensor, nn

# Section names of a run's settings (`--set method.capacity=16`): no method may take one as
# its name, since a study's `--set METHOD.SECTION.KEY=VALUE` scopes a setting to one method.
SETTING_SECTIONS = ("method", "optim", "train", "aug")


@dataclass(frozen=True)
class StepInfo:
    epoch: int  # 0-based epoch being trained
    step: int  # global optimiser step
    progress: float  # fraction of training done, in [0, 1)
    epochs: int = 1  # total epochs of the run


class Suggest(Protocol):
    """What a method's `search_space` asks for each knob (implemented by fgray.tune.spaces: an
    Optuna trial when searching, the defaults when giving the paper's point). `defaults` holds
    the value every knob has when nothing is searched: the Config defaults and the recipe's
    optimiser settings, with the study's fixed settings applied. A knob without `default=`
    takes its default from there."""

    defaults: dict[str, Any]

    def float(self, name: str, low: float, high: float, *, log: bool = False,
              default: float | None = None) -> float: ...

    def int(self, name: str, low: int, high: int, *, log: bool = False,
            default: int | None = None) -> int: ...

    def categorical(self, name: str, choices: Sequence[Any], *, default: Any = None) -> Any: ...


class Method(nn.Module):
    Config: ClassVar[type]
    name: ClassVar[str] = ""  # set by @register
    default_backbone: ClassVar[str] = "resnet50"
    augment_preset: ClassVar[str] = "mocov2"
    # OptimConfig field overrides: the recipe of the paper the method follows.
    optim_defaults: ClassVar[dict[str, Any]] = {}
    sync_bn: ClassVar[bool] = False
    # Knobs of `search_space` that steer it (a branch) but set nothing: recorded with a trial,
    # not passed to the run.
    structural: ClassVar[tuple[str, ...]] = ()
    # Whether the study presets run it (set by @register).
    in_presets: ClassVar[bool] = True

    @staticmethod
    def search_space(s: Suggest, fixed: dict[str, Any]) -> None:
        """Ask `s` for each knob a study searches, define-by-run: a knob may depend on an
        earlier choice. Knob names are Config fields (or `structural`); without `default=`,
        a knob's paper value is its Config default. `fixed` holds the study's fixed settings
        of the Config (typed, by field name). None by default: the shared knobs only."""

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


# ---------------------------------------------------------------- the registry

REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(name: str, *, in_presets: bool = True) -> Callable[[M], M]:
    """Class decorator: make a Method available by `name` (`--method NAME`, studies, presets;
    `in_presets=False` keeps it out of the presets' default method list)."""
    if not name.isidentifier() or name != name.lower() or name in SETTING_SECTIONS:
        raise ValueError(f"method name {name!r}: expected a lower-case identifier other than "
                         f"{', '.join(SETTING_SECTIONS)}")

    def add(cls: M) -> M:
        known = REGISTRY.get(name)
        # The same class again (its module reloaded) replaces itself; another one is a clash.
        if known is not None and (known.__module__, known.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise ValueError(f"method {name!r} is already registered by {known.__module__}."
                             f"{known.__qualname__}")
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"{cls.__qualname__}.Config: expected a dataclass of its knobs")
        cls.name = name
        cls.in_presets = in_presets
        REGISTRY[name] = cls
        return cls

    return add


def unregister(name: str) -> None:
    """Remove a method from the registry (tests that register their own)."""
    REGISTRY.pop(name, None)
