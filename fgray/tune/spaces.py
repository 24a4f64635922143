"""Search spaces: each method's own (its `search_space`, in its file) plus the shared knobs.

A space is define-by-run (Optuna's style): a function of a `Suggest` that asks for each knob
in turn, so a knob can depend on an earlier choice -- LoDisc's sampling temperature exists
only when sampling is stochastic, SDF's epsilon only for Gaussian perturbation, PP-SSL's
distillation knobs only when a CLIP teacher and a text corpus are configured. The same
function yields the papers' defaults (`Space.defaults`, enqueued as the first trial), so the
searched point and the published recipe can never disagree on names.

Each study searches one method (one Optuna study per method, see fgray.tune.study): the
method's own knobs are always searched; the shared ones (lr, weight_decay, temperature,
momentum) only when asked for. Knob names -- Optuna's parameter names, and the trials
table's `param.<name>` columns -- are bare: a method's own knobs are fields of its Config
(`capacity` sets `method.capacity`), the shared ones name their section in `SHARED_KEYS`
(`lr` sets `optim.lr`, `momentum` the method's EMA `method.momentum`). `Space.settings` turns a
sampled point into the run's settings with those qualified keys. Knobs that are no setting
(structural choices such as LoDisc's `sampling`) are the method's `structural`; they are
recorded with the trial but not passed to the run.

A Config default that depends on the backbone family (MoCo v3's temperature: 0.2 for ViTs,
1.0 for ResNets) is resolved for the space's `backbone` (the method's default backbone when
None), as the method resolves it when built.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from fgray.config import apply_overrides
from fgray.engine.optim import OptimConfig
from fgray.engine.spec import parse_settings
from fgray.errors import UserError
from fgray.methods import method_class

# The shared knobs and the setting each one sets.
SHARED_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay",
               "temperature": "method.temperature", "momentum": "method.momentum"}
SHARED_KNOBS = tuple(SHARED_KEYS)


class Suggest:
    """What a space function asks: `float`, `int`, `categorical`. Backed by an Optuna trial
    (search) or by the defaults (the published recipe), with the same calls either way."""

    def __init__(self, trial: Any | None, defaults: dict[str, Any]) -> None:
        self.trial = trial
        self.defaults = defaults
        self.params: dict[str, Any] = {}

    def _default(self, name: str, default: Any) -> Any:
        value = self.defaults.get(name) if default is None else default
        if value is None:
            raise KeyError(f"knob {name!r} has no default: expected a Config field or an "
                           "explicit default")
        return value

    def float(self, name: str, low: float, high: float, *, log: bool = False,
              default: float | None = None) -> float:
        if self.trial is not None:
            value = self.trial.suggest_float(name, low, high, log=log)
        else:
            value = float(self._default(name, default))
            _check_inside(name, value, low, high)
        self.params[name] = value
        return value

    def int(self, name: str, low: int, high: int, *, log: bool = False,
            default: int | None = None) -> int:
        if self.trial is not None:
            value = self.trial.suggest_int(name, low, high, log=log)
        else:
            value = int(self._default(name, default))
            _check_inside(name, value, low, high)
        self.params[name] = value
        return value

    def categorical(self, name: str, choices: Sequence[Any], *, default: Any = None) -> Any:
        if self.trial is not None:
            value = self.trial.suggest_categorical(name, list(choices))
        else:
            value = self._default(name, default)
            if value not in choices:
                raise ValueError(f"default {name}={value!r} is not among {list(choices)}")
        self.params[name] = value
        return value


def _check_inside(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"default {name}={value!r} lies outside its search range "
                         f"[{low:g}, {high:g}]")


def _shared(s: Suggest, names: Sequence[str]) -> None:
    """Shared knobs, ranged around the method's own default (a decade either way for rates
    and decays; the EMA momentum's distance to 1 likewise; the temperature from a quarter to
    2.5 times the recipe's: 0.05-0.5 around T = 0.2, 0.25-2.5 around MoCo v3's ResNet 1.0)."""
    if "lr" in names:
        d = s.defaults["lr"]
        s.float("lr", d / 10, d * 10, log=True)
    if "weight_decay" in names:
        d = s.defaults["weight_decay"]
        if d > 0:
            s.float("weight_decay", d / 10, d * 10, log=True)
    if "temperature" in names:
        d = s.defaults["temperature"]
        s.float("temperature", d / 4, d * 2.5, log=True)
    if "momentum" in names:
        gap = 1.0 - s.defaults["momentum"]
        s.float("momentum", max(0.0, 1.0 - gap * 10), 1.0 - gap / 10)


@dataclasses.dataclass(frozen=True)
class Space:
    """The search space of one method: callable as OptunaSearch's define-by-run `space`."""

    method: str
    shared: tuple[str, ...] = ("lr",)
    # The study's fixed settings, as pairs: `section.name` or bare keys, typed or strings.
    fixed: tuple[tuple[str, Any], ...] = ()
    backbone: str | None = None  # the study's backbone for this method; None: its default

    def __post_init__(self) -> None:
        method_class(self.method)  # an unknown method is a user error naming the known ones
        unknown = [k for k in self.shared if k not in SHARED_KEYS]
        if unknown:
            raise UserError(f"shared knob {unknown[0]!r}: expected one of "
                            f"{', '.join(SHARED_KNOBS)}")

    @property
    def structural(self) -> tuple[str, ...]:
        return tuple(method_class(self.method).structural)

    def key(self, knob: str) -> str:
        """The setting a knob sets: `optim.lr` for `lr`, `method.capacity` for `capacity`."""
        return SHARED_KEYS.get(knob, f"method.{knob}")

    def typed_fixed(self) -> dict[str, Any]:
        """The study's fixed settings with qualified keys, parsed to their fields' types (the
        command line gives strings: `--set optim.lr=0.01` must centre a range on 0.01, not on
        "0.01")."""
        return parse_settings(self.method, dict(self.fixed))

    def _fixed_section(self, section: str) -> dict[str, Any]:
        prefix = f"{section}."
        return {k[len(prefix):]: v for k, v in self.typed_fixed().items()
                if k.startswith(prefix)}

    def config_defaults(self) -> dict[str, Any]:
        """The value of each knob when nothing is searched, by bare knob name: the method's
        Config defaults and its recipe's optimiser settings, with the study's fixed settings
        applied. Where both have a field (MoCo's EMA `momentum`, SGD's) the method's is
        given, as knobs of that name set the method's."""
        cls = method_class(self.method)
        optim = apply_overrides(apply_overrides(OptimConfig(), cls.optim_defaults),
                                self._fixed_section("optim"), what="optimiser setting")
        cfg = apply_overrides(cls.Config(), self._fixed_section("method"),
                              what=f"{self.method} setting")
        if cls.family_defaults(True):  # some defaults depend on the backbone family
            cfg = cls.resolve_config(cfg, _is_vit(self.backbone or cls.default_backbone))
        method = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return {**dataclasses.asdict(optim), **method}

    def _run(self, trial: Any | None) -> dict[str, Any]:
        s = Suggest(trial, self.config_defaults())
        method_class(self.method).search_space(s, self._fixed_section("method"))
        # A shared knob the study fixes (--set optim.lr=...) is a setting, not a dimension.
        fixed = self.typed_fixed()
        _shared(s, [k for k in self.shared if self.key(k) not in fixed])
        return s.params

    def __call__(self, trial: Any) -> None:
        """OptunaSearch's define-by-run hook: suggestions are captured from the trial."""
        self._run(trial)

    def defaults(self) -> dict[str, Any]:
        """The published recipe as a point of this space (the first trial of a study)."""
        return self._run(None)

    def settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """The run settings of a sampled point, keys qualified (`method.capacity`,
        `optim.lr`); structural knobs dropped."""
        return {self.key(k): v for k, v in params.items() if k not in self.structural}

    def knob_names(self) -> set[str]:
        """Every knob this space can ask for (all branches), found by sampling each branch."""
        import optuna

        names: set[str] = set()
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(32):
            trial = study.ask()
            names |= set(self._run(trial))
            study.tell(trial, 0.0)
        return names | set(self.defaults())

    def validate(self) -> None:
        """Fail fast on a knob that sets no field (a method knob that is no field of the
        method's Config, a shared knob the method lacks), and on a recipe default outside its
        range."""
        cls = method_class(self.method)
        fields = {"method": {f.name for f in dataclasses.fields(cls.Config)},
                  "optim": {f.name for f in dataclasses.fields(OptimConfig)}}
        try:
            names = self.knob_names()
        except ValueError as exc:
            raise UserError(f"search space of {self.method}: {exc}") from None
        for name in sorted(names - set(self.structural)):
            section, _, field = self.key(name).partition(".")
            if field not in fields[section]:
                raise UserError(f"search space of {self.method}: {name!r} is not a field of "
                                f"{cls.Config.__name__}: expected one of "
                                f"{', '.join(sorted(fields['method']))}")


@functools.cache
def _is_vit(backbone: str) -> bool:
    """Whether timm builds `backbone` as a VisionTransformer (`Backbone.is_vit`), told from a
    model on the meta device: no memory, no weights."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(backbone):
        raise UserError(f"unknown backbone '{backbone}': expected a timm model name, e.g. "
                        "resnet50, vit_base_patch16_224, test_resnet, test_vit")
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    return isinstance(model, VisionTransformer)


def space_for(method: str, *, shared: Sequence[str] = ("lr",),
              fixed: dict[str, Any] | None = None, backbone: str | None = None) -> Space:
    space = Space(method, tuple(shared), tuple(sorted((fixed or {}).items())), backbone)
    space.validate()
    return space

