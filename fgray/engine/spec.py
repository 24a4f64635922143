"""RunSpec: everything one pretraining run needs, as typed configs.

The same spec drives an in-process run, each Ray Train worker and each Tune trial, so it
round-trips through a plain dict (`to_dict` / `from_dict`).

A run's settings come in four sections, one dataclass each: `method.` (the method's Config),
`optim.` (OptimConfig), `train.` (TrainConfig) and `aug.` (AugmentConfig). `build_spec` takes
them as `--set` pairs, `section.name` or a bare name that only one section has, and parses each
value to its field's type once: the spec holds typed values only, so a run set from the command
line (`"0.1"`) and the same run set by a Tune trial (`0.1`) are equal and hash the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fgray.config import apply_overrides, check_range, config_hash, split_settings
from fgray.data.augment import PRESETS, AugmentConfig
from fgray.engine.optim import OptimConfig
from fgray.methods import method_class
from fgray.models.backbone import backbone_normalisation


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128  # global, across all workers
    image_size: int = 224
    cache_size: int = 0  # decoded-cache side; 0 means image_size * 8 / 7
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    channels_last: bool = True
    fused_optimizer: bool = True  # used on GPU only
    knn_k: int = 200
    knn_temperature: float = 0.1
    eval_every: int = 1
    visual_every: int = 1  # epochs between TensorBoard spatial maps / image pairs; 0: none
    # Images per embedding batch in evaluation (val kNN, test). None: 256 on a GPU, 32 on a
    # CPU, where a small batch stays in cache: 1.7x the images/s of 256 for
    # tf_efficientnet_lite0 at 96 px on one core (channels-last).
    eval_batch_size: int | None = None
    keep_checkpoints: int = 2

    def validate(self) -> None:
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 2)
        check_range("image_size", self.image_size, 16, 1024)
        check_range("cache_size", self.cache_size, 0, 2048)
        check_range("knn_k", self.knn_k, 1)
        check_range("knn_temperature", self.knn_temperature, 0.0, lo_open=True)
        check_range("eval_every", self.eval_every, 1)
        check_range("visual_every", self.visual_every, 0)
        check_range("keep_checkpoints", self.keep_checkpoints, 1)
        if self.eval_batch_size is not None:
            check_range("eval_batch_size", self.eval_batch_size, 1)

    def eval_batch_for(self, device: torch.device) -> int:
        """`eval_batch_size`, or its default for `device`."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return 256 if device.type == "cuda" else 32

    @property
    def decoded_size(self) -> int:
        return self.cache_size or int(round(self.image_size * 8 / 7))


@dataclass
class DataSpec:
    format: str = "cub"
    root: str = ""
    val_fraction: float = 0.1
    split_seed: int = 0
    aircraft_level: str = "variant"
    cache_dir: str | None = None


@dataclass
class RunSpec:
    method: str
    data: DataSpec
    backbone: str | None = None
    init: str = "random"
    method_config: Any = None  # the method's Config dataclass; None: its defaults
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.method_config is None:
            self.method_config = method_class(self.method).Config()

    @property
    def backbone_name(self) -> str:
        return self.backbone or method_class(self.method).default_backbone

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        """The spec of `to_dict`'s output; a spec written before `method_config` (its
        `method_overrides` strings) loads too."""
        config_cls = method_class(d["method"]).Config
        method = d.get("method_config")
        if method is None:
            method = d.get("method_overrides") or {}
        return cls(method=d["method"], data=DataSpec(**d["data"]), backbone=d.get("backbone"),
                   init=d.get("init", "random"),
                   method_config=apply_overrides(config_cls(), method,
                                                 what=f"{d['method']} setting"),
                   train=apply_overrides(TrainConfig(), d["train"], what="train setting"),
                   optim=apply_overrides(OptimConfig(), d["optim"], what="optimiser setting"),
                   augment=apply_overrides(AugmentConfig(), d["augment"],
                                           what="augmentation setting"))

    def hash(self) -> str:
        """Identifies the experiment (not where its data lives)."""
        return config_hash(dataclasses.replace(self, data=dataclasses.replace(
            self.data, root="", cache_dir=None)))


def setting_sections(method: str) -> dict[str, type]:
    """The dataclass of each settings section of a run of `method`."""
    return {"method": method_class(method).Config, "optim": OptimConfig,
            "train": TrainConfig, "aug": AugmentConfig}


def parse_settings(method: str, sets: Mapping[str, Any] | None) -> dict[str, Any]:
    """`sets` for a run of `method`, each key qualified (`capacity` -> `method.capacity`) and
    each value parsed to its field's type; ranges are checked by `build_spec`."""
    split = split_settings(sets or {}, setting_sections(method), owner=method)
    return {f"{section}.{name}": value for section, values in split.items()
            for name, value in values.items()}


def build_spec(method: str, data: DataSpec, *, backbone: str | None = None,
               init: str = "random", train: dict[str, Any] | None = None,
               sets: Mapping[str, Any] | None = None) -> RunSpec:
    """Resolve a run from the method's defaults, explicit train settings and `--set` pairs.

    A `sets` key is `method.NAME` (a field of the method's Config), `optim.NAME` (lr,
    weight_decay, optimizer, momentum, warmup_epochs, ...), `train.NAME` (knn_k, precision,
    ...) or `aug.NAME` (an augmentation parameter); a bare NAME is accepted where exactly one
    section has it (`capacity`, `lr`), and is an error naming the candidates where more do
    (MoCo's EMA `momentum` and SGD's: `method.momentum` or `optim.momentum`). Values may be
    strings (the command line) or typed (a Tune trial); `train.*` wins over `train`.
    """
    cls = method_class(method)
    split = split_settings(sets or {}, setting_sections(method), owner=method)
    method_cfg = apply_overrides(cls.Config(), split["method"], what=f"{method} setting")
    train_cfg = apply_overrides(TrainConfig(), {**(train or {}), **split["train"]},
                                what="train setting")
    optim_cfg = apply_overrides(apply_overrides(OptimConfig(), cls.optim_defaults),
                                split["optim"], what="optimiser setting")
    preset = PRESETS[cls.augment_preset]
    # The views are normalised with the backbone's own statistics unless set explicitly.
    mean, std = backbone_normalisation(backbone or cls.default_backbone)
    aug_cfg = apply_overrides(preset, {"size": train_cfg.image_size, "mean": mean, "std": std,
                                       **split["aug"]}, what="augmentation setting")
    return RunSpec(method=method, data=data, backbone=backbone, init=init,
                   method_config=method_cfg, train=train_cfg, optim=optim_cfg, augment=aug_cfg)
