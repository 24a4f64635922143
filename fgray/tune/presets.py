"""Study presets: how big a study is, from a laptop smoke test to the papers' protocol.

- `smoke`: tiny timm models (test_resnet / test_vit) at 48 px (the smallest size at which
  test_resnet still has a 2x2 feature map for LCR) on a small embedded dataset,
  a few epochs and trials: the whole pipeline end to end in minutes on a laptop CPU.
- `laptop`: small real backbones (resnet18 / vit_tiny) at 64 px, tens of epochs.
- `paper`: the papers' protocol -- ResNet-50 or ViT-B/16 at 224 px, 100 epochs, ImageNet
  initialisation, batch 128, one GPU per worker.

Every field can be overridden by a flag of the study scripts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fgray.errors import UserError
from fgray.methods import method_class


@dataclass(frozen=True)
class Preset:
    cnn_backbone: str | None  # for methods whose default backbone is a CNN; None: default
    vit_backbone: str | None  # for ViT methods
    image_size: int
    epochs: int
    trials: int
    batch_size: int
    methods: tuple[str, ...]
    grace_period: int
    reduction_factor: int
    init: str = "random"
    gpus_per_worker: float | None = None  # None: one per worker when the cluster has GPUs
    synthetic: dict[str, int] = field(default_factory=dict)  # write_synthetic arguments
    # Method settings that fit the preset's scale, applied where a method has the field.
    method_settings: dict[str, Any] = field(default_factory=dict)

    def backbone_for(self, method: str) -> str | None:
        default = method_class(method).default_backbone
        return self.vit_backbone if default.startswith("vit") else self.cnn_backbone

    def settings_for(self, method: str) -> dict[str, Any]:
        fields = {f.name for f in dataclasses.fields(method_class(method).Config)}
        return {k: v for k, v in self.method_settings.items() if k in fields}


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        cnn_backbone="test_resnet", vit_backbone="test_vit", image_size=48, epochs=3, trials=2,
        batch_size=32, methods=("moco", "lcr", "sdf", "ppssl", "lodisc"), grace_period=1,
        reduction_factor=2,
        synthetic={"classes": 10, "per_class": 24, "size": 48},
        # A queue and projector sized for a 90-image train split; SDF's synthesized pairs
        # start after one epoch instead of five.
        method_settings={"queue_size": 256, "mlp_hidden": 256, "warmup_epochs": 1,
                         "decoder_size": 32}),
    "laptop": Preset(
        cnn_backbone="resnet18", vit_backbone="vit_tiny_patch16_224", image_size=64, epochs=20,
        trials=12, batch_size=64, methods=("moco", "lcr", "sdf", "ppssl", "lodisc"),
        grace_period=2, reduction_factor=2,
        synthetic={"classes": 20, "per_class": 40, "size": 96},
        method_settings={"queue_size": 4096, "mlp_hidden": 1024, "warmup_epochs": 2}),
    "paper": Preset(
        cnn_backbone=None, vit_backbone=None, image_size=224, epochs=100, trials=32,
        batch_size=128, methods=("moco", "lcr", "sdf", "ppssl", "lodisc"), grace_period=10,
        reduction_factor=3, init="imagenet", gpus_per_worker=1.0,
        synthetic={"classes": 50, "per_class": 60, "size": 256}),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}") from None
