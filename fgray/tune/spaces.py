"""Search spaces of every method, in one place (ranges from METHODS.md).

A space is define-by-run (Optuna's style): a function of a `Suggest` that asks for each knob
in turn, so a knob can depend on an earlier choice -- LoDisc's sampling temperature exists
only when sampling is stochastic, SDF's epsilon only for Gaussian perturbation, PP-SSL's
distillation knobs only when a CLIP teacher and a text corpus are configured. The same
function yields the papers' defaults (`Space.defaults`, enqueued as the first trial), so the
searched point and the published recipe can never disagree on names.

Each study searches one method (one Optuna study per method, see fgray.tune.study): the
method's own knobs are always searched; the shared ones (lr, weight_decay, temperature,
momentum) only when asked for. Knob names are `--set` keys: a method Config field or an
optimiser setting. Names that are neither (structural choices such as `sampling`) are listed
in `Space.structural`; they are recorded with the trial but not passed to the run.

A Config default that depends on the backbone family (MoCo v3's temperature: 0.2 for ViTs,
1.0 for ResNets) is resolved for the space's `backbone` (the method's default backbone when
None), as the method resolves it when built.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Sequence
from typing import Any

from fgray.config import coerce
from fgray.engine.optim import OptimConfig
from fgray.errors import UserError
from fgray.methods import REGISTRY, method_class

SHARED_KNOBS = ("lr", "weight_decay", "temperature", "momentum")


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


# ---------------------------------------------------------------- per-method knobs


def _lcr(s: Suggest, fixed: dict[str, Any]) -> None:
    s.int("capacity", 1, 256, log=True)
    s.categorical("depth", (1, 2))
    s.float("nu", 1e-3, 1e-1, log=True)
    s.float("t", 0.1, 1.0)


def _lodisc(s: Suggest, fixed: dict[str, Any]) -> None:
    s.float("keep_ratio", 0.1, 0.9)
    s.float("local_weight", 0.1, 10.0, log=True)
    s.categorical("fusion", ("product", "last", "rollout"))
    # The released code keeps the top patches deterministically (temperature 0).
    stochastic = s.defaults.get("sample_temperature", 0.0) > 0
    if s.categorical("sampling", ("topk", "stochastic"),
                     default="stochastic" if stochastic else "topk") == "stochastic":
        s.float("sample_temperature", 0.05, 2.0, log=True)


def _sdf(s: Suggest, fixed: dict[str, Any]) -> None:
    if s.categorical("perturb", ("gaussian", "shuffle")) == "gaussian":
        s.float("epsilon", 0.1, 3.0, log=True)
    s.float("q_var", 0.05, 0.6)
    s.float("q_cam", 0.05, 0.6)
    s.categorical("set_rule", ("union", "intersection"))
    s.float("alpha", 0.1, 10.0, log=True)
    s.float("nu", 0.05, 2.0, log=True)


def _ppssl(s: Suggest, fixed: dict[str, Any]) -> None:
    s.float("iadm_weight", 0.1, 2.0, log=True)
    s.float("keep_fraction", 0.2, 0.8)
    # AIS needs a CLIP teacher and a text corpus; without them it stays off (kd_weight 0).
    if fixed.get("clip_weights") and fixed.get("corpus_path"):
        s.float("kd_weight", 0.01, 10.0, log=True, default=1.0)
        s.float("kd_temperature", 0.01, 0.5, log=True)


def _none(s: Suggest, fixed: dict[str, Any]) -> None:
    """MoCo v2 / v3 have no knobs of their own beyond the shared ones."""


METHOD_KNOBS: dict[str, Callable[[Suggest, dict[str, Any]], None]] = {
    "moco": _none, "mocov3": _none, "lcr": _lcr, "lodisc": _lodisc, "sdf": _sdf,
    "ppssl": _ppssl,
}
# Knobs that steer the space but are not settings of the run.
STRUCTURAL: dict[str, tuple[str, ...]] = {"lodisc": ("sampling",)}


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
    fixed: tuple[tuple[str, Any], ...] = ()  # the study's fixed settings, as pairs
    backbone: str | None = None  # the study's backbone for this method; None: its default

    def __post_init__(self) -> None:
        if self.method not in METHOD_KNOBS:
            raise UserError(f"no search space for method {self.method!r}: expected one of "
                            f"{', '.join(METHOD_KNOBS)}")
        unknown = [k for k in self.shared if k not in SHARED_KNOBS]
        if unknown:
            raise UserError(f"shared knob {unknown[0]!r}: expected one of "
                            f"{', '.join(SHARED_KNOBS)}")

    @property
    def structural(self) -> tuple[str, ...]:
        return STRUCTURAL.get(self.method, ())

    def config_defaults(self) -> dict[str, Any]:
        """The values a run of this method uses when nothing is set: its Config defaults,
        over the optimiser defaults of its recipe, with the study's fixed settings on top."""
        cls = method_class(self.method)
        optim = dataclasses.asdict(OptimConfig(**{**dataclasses.asdict(OptimConfig()),
                                                  **cls.optim_defaults}))
        cfg = cls.Config()
        if cls.family_defaults(True):  # some defaults depend on the backbone family
            cfg = cls.resolve_config(cfg, _is_vit(self.backbone or cls.default_backbone))
        method = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls.Config)}
        return {**optim, **method, **self.typed_fixed()}

    def typed_fixed(self) -> dict[str, Any]:
        """The study's fixed settings parsed to their fields' types (the command line gives
        strings: `--set lr=0.01` must centre a range on 0.01, not on "0.01")."""
        cls = method_class(self.method)
        types = {**typing.get_type_hints(OptimConfig), **typing.get_type_hints(cls.Config)}
        return {k: (coerce(k, v, types[k]) if k in types else v) for k, v in self.fixed}

    def _run(self, trial: Any | None) -> dict[str, Any]:
        s = Suggest(trial, self.config_defaults())
        METHOD_KNOBS[self.method](s, dict(self.fixed))
        # A shared knob the study fixes (--set lr=...) is a setting, not a search dimension.
        _shared(s, [k for k in self.shared if k not in dict(self.fixed)])
        return s.params

    def __call__(self, trial: Any) -> None:
        """OptunaSearch's define-by-run hook: suggestions are captured from the trial."""
        self._run(trial)

    def defaults(self) -> dict[str, Any]:
        """The published recipe as a point of this space (the first trial of a study)."""
        return self._run(None)

    def settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """The `--set` pairs of a sampled point (structural knobs dropped)."""
        return {k: v for k, v in params.items() if k not in self.structural}

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
        """Fail fast on a knob that is no field of the method's Config (or, for shared knobs,
        of the optimiser), and on a recipe default outside its range."""
        cls = method_class(self.method)
        method_fields = {f.name for f in dataclasses.fields(cls.Config)}
        optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
        try:
            names = self.knob_names()
        except ValueError as exc:
            raise UserError(f"search space of {self.method}: {exc}") from None
        for name in sorted(names - set(self.structural)):
            allowed = method_fields | (optim_fields if name in SHARED_KNOBS else set())
            if name not in allowed:
                raise UserError(f"search space of {self.method}: {name!r} is not a field of "
                                f"{cls.Config.__name__}: expected one of "
                                f"{', '.join(sorted(method_fields))}")


@functools.lru_cache(maxsize=None)
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


def all_methods() -> list[str]:
    return [m for m in REGISTRY if m in METHOD_KNOBS]

