"""Study presets: how big a study is, from a laptop smoke test to the papers' protocol.

- `smoke`: the whole pipeline end to end on a laptop CPU in minutes, on real weights:
  EfficientNet-Lite0 from ImageNet (`tf_efficientnet_lite0.in1k`, about 3.4 M parameters, the
  one ImageNet network whose weights fgray can load offline from an installed package) for
  every method, 96 px, 3 epochs, 2 searched trials per method, the best of each retrained
  over 3 seeds, trials in their own process (`--workers 0`). LoDisc runs on the CNN with its
  location map from the last feature map's activation norm ("cnn location map [ours]" in the
  leaderboard): its attention map needs a ViT, and no ViT is small enough here.
- `laptop`: the same network at 128 px on a larger embedded set, 20 epochs, 12 trials.
- `paper`: the papers' protocol -- 224 px, 100 epochs, batch 128, one GPU per Ray Train worker
  (`--workers 1`, DDP with more), from the ImageNet weights the papers started from, named
  exactly with their timm tags:
  - CNN methods: `resnet50.tv_in1k`, torchvision's ResNet-50 IMAGENET1K_V1, the weights LCR's
    code loads (`torchvision.models.resnet50(pretrained=True)`).
  - ViT methods: LoDisc's code loads torchvision's `vit_b_16` IMAGENET1K_V1 weights (ImageNet-1k
    from scratch with a modified DeiT recipe, 81.1 % top-1), which timm does not host. The
    closest timm weights are `deit_base_patch16_224.fb_in1k`: the same ViT-B/16 architecture
    (timm builds it as a VisionTransformer), ImageNet-1k only, the DeiT recipe, 81.8 % top-1,
    ImageNet mean/std. Under timm's `vit_base_patch16_224` name the closest is `.augreg_in1k`
    (ImageNet-1k only, AugReg recipe, 79.2 %); timm's default `.augreg2_in21k_ft_in1k` was
    pretrained on ImageNet-21k, which neither paper used.

The trials table records the weights a run started from (`backbone` with its tag, `init`), and
the leaderboard shows them. Every field can be overridden by a flag of the study scripts.
Every preset studies every registered method that registered for the presets (MoCo v3 did not:
it is LoDisc's core, run on its own with `--methods mocov3`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fgray.engine.spec import parse_settings
from fgray.errors import UserError
from fgray.methods import method_class, method_names

ALL_METHODS = tuple(m for m in method_names() if method_class(m).in_presets)
PROTOCOLS = ("retrieval", "knn", "linear", "localisation")


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
    workers: int = 1  # 0: each trial runs the engine loop itself; N: a Ray Train run of N
    seeds: int = 1  # seeds of each method's best configuration (compare: of every method)
    protocols: tuple[str, ...] = PROTOCOLS
    val_fraction: float = 0.1
    gpus_per_worker: float | None = None  # None: one per worker when the cluster has GPUs
    synthetic: dict[str, int] = field(default_factory=dict)  # write_synthetic arguments
    # Method settings (Config fields) that fit the preset's scale, applied where a method has
    # the field.
    method_settings: dict[str, Any] = field(default_factory=dict)
    # Train settings (TrainConfig fields) for every method (e.g. kNN's k: the papers' 200
    # neighbours would be most of a laptop set's train split).
    train_settings: dict[str, Any] = field(default_factory=dict)
    # Settings of one method only (`section.name` keys), on top of the rest.
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)

    def backbone_for(self, method: str) -> str | None:
        default = method_class(method).default_backbone
        return self.vit_backbone if default.startswith("vit") else self.cnn_backbone

    def settings_for(self, method: str) -> dict[str, Any]:
        """The preset's settings of a run of `method`, keys qualified (`method.queue_size`,
        `train.knn_k`) and values typed."""
        fields = {f.name for f in dataclasses.fields(method_class(method).Config)}
        own = {f"method.{k}": v for k, v in self.method_settings.items() if k in fields}
        train = {f"train.{k}": v for k, v in self.train_settings.items()}
        return parse_settings(method, {**train, **own, **self.per_method.get(method, {})})


LITE0 = "tf_efficientnet_lite0.in1k"

# LoDisc's released test feature is its predictor's output, a head trained from scratch
# alongside the encoder: after a laptop budget of a few epochs it is still mostly a random
# projection (measured on the smoke set: test kNN 32.3 % against 47.9 % for MoCo's pooled
# encoder feature, below the 36.3 % of the untrained weights). The laptop presets score
# LoDisc on its encoder's pooled feature, as every other method is scored; the paper preset
# keeps the released predictor feature.
LAPTOP_LODISC = {"lodisc": {"method.embed": "encoder"}}

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        cnn_backbone=LITE0, vit_backbone=LITE0, image_size=96, epochs=2, trials=2,
        batch_size=32, methods=ALL_METHODS, grace_period=1, reduction_factor=2,
        init="imagenet", workers=0, seeds=3, val_fraction=0.25,
        # The calibrated embedded set (docs/configuration.md, "The embedded fine-grained
        # dataset"): the untrained lite0 features reach 35.7 % test kNN top-1 at 96 px, chance
        # 10 %. A quarter of train for validation: 75 images, so one image moves val kNN by
        # 1.3 points.
        synthetic={"classes": 10, "per_class": 60, "size": 96},
        # A queue and projector sized for lite0's 1280-d feature and 225 train images; SDF's
        # synthesized pairs start after one epoch instead of five.
        method_settings={"queue_size": 1024, "mlp_hidden": 512, "warmup_epochs": 1,
                         "decoder_size": 32},
        train_settings={"knn_k": 20},
        per_method=LAPTOP_LODISC),
    "laptop": Preset(
        cnn_backbone=LITE0, vit_backbone=LITE0, image_size=128, epochs=20, trials=12,
        batch_size=64, methods=ALL_METHODS, grace_period=2, reduction_factor=2,
        init="imagenet", workers=0, seeds=3, val_fraction=0.2,
        # Twice the classes of smoke at the same per-class budget: chance 5 %, the untrained
        # lite0 features ~20 % (docs/configuration.md's calibration table).
        synthetic={"classes": 20, "per_class": 80, "size": 128},
        method_settings={"queue_size": 4096, "mlp_hidden": 1024, "warmup_epochs": 2},
        train_settings={"knn_k": 50},
        per_method=LAPTOP_LODISC),
    "paper": Preset(
        cnn_backbone="resnet50.tv_in1k", vit_backbone="deit_base_patch16_224.fb_in1k",
        image_size=224, epochs=100, trials=32, batch_size=128, methods=ALL_METHODS,
        grace_period=10, reduction_factor=3, init="imagenet", workers=1, seeds=3,
        gpus_per_worker=1.0, synthetic={"classes": 50, "per_class": 60, "size": 256}),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}") from None
