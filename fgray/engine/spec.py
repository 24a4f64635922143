"""RunSpec: everything one pretraining run needs, as plain data.

The same spec drives an in-process run, each Ray Train worker and each Tune trial, so it
round-trips through a flat dict (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from fgray.config import apply_overrides, check_range, config_hash
from fgray.data.augment import PRESETS, AugmentConfig
from fgray.engine.optim import OptimConfig
from fgray.errors import UserError
from fgray.methods import method_class, method_config
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
    eval_batch_size: int = 256
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
    method_overrides: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def backbone_name(self) -> str:
        return self.backbone or method_class(self.method).default_backbone

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        aug = dict(d["augment"])
        for key in ("blur_p", "solarize_p", "mean", "std"):
            aug[key] = tuple(aug[key])
        return cls(method=d["method"], data=DataSpec(**d["data"]), backbone=d.get("backbone"),
                   init=d.get("init", "random"),
                   method_overrides=dict(d.get("method_overrides", {})),
                   train=TrainConfig(**d["train"]), optim=OptimConfig(**d["optim"]),
                   augment=AugmentConfig(**aug))

    def hash(self) -> str:
        """Identifies the experiment (not where its data lives)."""
        return config_hash(dataclasses.replace(self, data=dataclasses.replace(
            self.data, root="", cache_dir=None)))


def build_spec(method: str, data: DataSpec, *, backbone: str | None = None,
               init: str = "random", train: dict[str, Any] | None = None,
               sets: dict[str, Any] | None = None) -> RunSpec:
    """Resolve a run from the method's defaults, explicit train settings and `--set` pairs.

    A `--set` key names a method knob, an optimiser setting (lr, weight_decay, optimizer,
    warmup_epochs, ...), a train setting (knn_k, precision, ...) or an augmentation parameter
    as `aug.NAME`; method knobs win where names coincide.
    """
    cls = method_class(method)
    method_fields = {f.name for f in dataclasses.fields(cls.Config)}
    optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    m_over, o_over, t_over, a_over = {}, {}, dict(train or {}), {}
    for key, value in (sets or {}).items():
        if key in method_fields:
            m_over[key] = value
        elif key in optim_fields:
            o_over[key] = value
        elif key in train_fields:
            t_over[key] = value
        elif key.startswith("aug."):
            a_over[key[4:]] = value
        else:
            known = sorted(method_fields | optim_fields | train_fields) + ["aug.<name>"]
            raise UserError(f"unknown setting {key!r} for method {method}: expected one of"
                            f" {', '.join(known)}")
    method_config(method, m_over)  # validates now, with a clear message
    train_cfg = apply_overrides(TrainConfig(), t_over, what="train setting")
    optim_cfg = apply_overrides(apply_overrides(OptimConfig(), cls.optim_defaults), o_over,
                                what="optimiser setting")
    preset = PRESETS[cls.augment_preset]
    # The views are normalised with the backbone's own statistics unless set explicitly.
    mean, std = backbone_normalisation(backbone or cls.default_backbone)
    aug_cfg = apply_overrides(preset, {"size": train_cfg.image_size, "mean": mean, "std": std,
                                       **a_over}, what="augmentation setting")
    return RunSpec(method=method, data=data, backbone=backbone, init=init,
                   method_overrides=m_over, train=train_cfg, optim=optim_cfg, augment=aug_cfg)
